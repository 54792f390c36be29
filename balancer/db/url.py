"""Database URLs of the form mysql://user:password@host:port/database."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from balancer.errors import ConfigError


@dataclass(frozen=True)
class DatabaseUrl:
    """Parsed connection parameters; the password never appears in repr or str."""

    host: str
    port: int
    user: str
    database: str
    password: str = field(default="", repr=False)

    def __str__(self) -> str:
        """The URL with the password masked, safe for logs and output."""
        secret = ":***" if self.password else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mysql://{quote(self.user)}{secret}@{host}:{self.port}/{self.database}"

    def with_database(self, database: str) -> DatabaseUrl:
        """The same server and credentials, another database."""
        return DatabaseUrl(self.host, self.port, self.user, database, self.password)

    def unmasked(self) -> str:
        """The full URL including the password (for handing to a child process only)."""
        secret = f":{quote(self.password, safe='')}" if self.password else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mysql://{quote(self.user, safe='')}{secret}@{host}:{self.port}/{self.database}"


def parse_database_url(text: str, key: str = "database.url") -> DatabaseUrl:
    """Parse and validate a mysql:// URL; errors name ``key`` and never echo the password."""
    form = "expected 'mysql://user:password@host:port/database'"
    try:
        parts = urlsplit(text.strip())
        port = parts.port or 3306
    except ValueError:
        raise ConfigError(f"{key}: {form} (bad host or port)") from None
    if parts.scheme not in ("mysql", "mariadb", "mysql+pymysql"):
        raise ConfigError(f"{key}: {form} (scheme {parts.scheme!r} is not mysql)")
    if not parts.hostname:
        raise ConfigError(f"{key}: {form} (no host)")
    if not parts.username:
        raise ConfigError(f"{key}: {form} (no user)")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ConfigError(f"{key}: {form} (no database name)")
    return DatabaseUrl(
        host=parts.hostname,
        port=port,
        user=unquote(parts.username),
        database=database,
        password=unquote(parts.password or ""),
    )
