"""VICIdial's /etc/astguiclient.conf: the fallback source of database credentials."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from balancer.db.url import DatabaseUrl
from balancer.errors import ConfigError


@dataclass(frozen=True)
class AstGuiClient:
    """The VAR* settings of one astguiclient.conf."""

    path: str
    values: dict[str, str] = field(repr=False)

    def database_url(self) -> DatabaseUrl:
        """Database credentials from the VARDB_* lines."""
        missing = [
            k for k in ("VARDB_server", "VARDB_database", "VARDB_user") if not self.values.get(k)
        ]
        if missing:
            raise ConfigError(
                f"{self.path}: {missing[0]} is missing (expected 'VARDB_... => value')"
            )
        port_text = self.values.get("VARDB_port", "3306") or "3306"
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"{self.path}: VARDB_port must be a port number, got {port_text!r}")
        return DatabaseUrl(
            host=self.values["VARDB_server"],
            port=int(port_text),
            user=self.values["VARDB_user"],
            database=self.values["VARDB_database"],
            password=self.values.get("VARDB_pass", ""),
        )

    @property
    def server_ip(self) -> str | None:
        """This host's own server_ip (VARserver_ip), if present."""
        return self.values.get("VARserver_ip") or None


def parse_astguiclient(text: str, path: str = "astguiclient.conf") -> AstGuiClient:
    """Parse 'VARname => value' lines; comments (#) and other lines are ignored."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("VAR") or "=>" not in line:
            continue
        name, _, value = line.partition("=>")
        values[name.strip()] = value.strip()
    return AstGuiClient(path, values)


def read_astguiclient(path: Path) -> AstGuiClient:
    """Read and parse an astguiclient.conf file."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_astguiclient(text, str(path))
