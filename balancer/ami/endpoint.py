"""Where and how to reach one server's AMI (plain data, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AmiEndpoint:
    """Where and how to log in to one server's AMI; the secret never shows in repr."""

    server_ip: str
    host: str
    port: int
    username: str
    secret: str = field(repr=False)
    server_id: str = ""

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
