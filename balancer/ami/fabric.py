"""The set of AMI sessions, one per watched server, kept in step with the registry."""

from __future__ import annotations

import asyncio
import logging

from balancer.ami.endpoint import AmiEndpoint
from balancer.ami.session import AmiMessage, AmiSession, SessionListener
from balancer.config import AmiConfig, HealthConfig
from balancer.errors import AmiError

log = logging.getLogger(__name__)


class Fabric:
    """Starts, restarts and stops sessions as servers come, change and go."""

    def __init__(
        self,
        ami: AmiConfig,
        health: HealthConfig,
        listener: SessionListener,
        filters: tuple[str, ...] = (),
    ) -> None:
        self.ami = ami
        self.health = health
        self.listener = listener
        self.filters = filters
        self.sessions: dict[str, AmiSession] = {}
        # Reconnects of sessions already closed (removed, replaced or shut down), so that the
        # total survives them: the daemon's shutdown summary reads it after close().
        self._closed_reconnects = 0

    @property
    def reconnects(self) -> int:
        """Reconnect attempts of every session this fabric ran, closed ones included."""
        return self._closed_reconnects + sum(s.reconnects for s in self.sessions.values())

    async def _close(self, session: AmiSession) -> None:
        await session.stop()
        self._closed_reconnects += session.reconnects

    async def sync(self, endpoints: dict[str, AmiEndpoint]) -> tuple[list[str], list[str]]:
        """Connect new servers, reconnect changed ones, disconnect removed ones.

        Returns (started, stopped) server_ips; a changed server appears in both.
        """
        started: list[str] = []
        stopped: list[str] = []
        for server_ip in sorted(set(self.sessions) - set(endpoints)):
            await self._close(self.sessions.pop(server_ip))
            stopped.append(server_ip)
            log.info("AMI %s: removed from the registry; session closed", server_ip)
        for server_ip, endpoint in sorted(endpoints.items()):
            current = self.sessions.get(server_ip)
            if current is not None and current.endpoint == endpoint:
                continue
            if current is not None:
                log.info("AMI %s: address or credentials changed; reconnecting", server_ip)
                del self.sessions[server_ip]
                await self._close(current)
                stopped.append(server_ip)
            session = AmiSession(endpoint, self.ami, self.health, self.listener, self.filters)
            self.sessions[server_ip] = session
            session.start()
            started.append(server_ip)
        return started, stopped

    async def snapshot(self, server_ip: str) -> list[AmiMessage]:
        """CoreShowChannels items of one server."""
        session = self.sessions.get(server_ip)
        if session is None:
            raise AmiError(f"AMI {server_ip}: no session")
        return await session.list_action({"Action": "CoreShowChannels"})

    async def close(self) -> dict[str, AmiSession]:
        """Log off and close every session; returns them (stopped) for a last look."""
        sessions, self.sessions = self.sessions, {}
        results = await asyncio.gather(
            *(self._close(s) for s in sessions.values()), return_exceptions=True
        )
        for session, result in zip(sessions.values(), results, strict=True):
            if isinstance(result, BaseException):
                # Counted anyway: stop() failing must not make reconnects vanish from the total.
                self._closed_reconnects += session.reconnects
                log.error("%s: close failed: %s", session.name, result)
        return sessions
