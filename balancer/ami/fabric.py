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

    async def sync(self, endpoints: dict[str, AmiEndpoint]) -> tuple[list[str], list[str]]:
        """Connect new servers, reconnect changed ones, disconnect removed ones.

        Returns (started, stopped) server_ips; a changed server appears in both.
        """
        started: list[str] = []
        stopped: list[str] = []
        for server_ip in sorted(set(self.sessions) - set(endpoints)):
            await self.sessions.pop(server_ip).stop()
            stopped.append(server_ip)
            log.info("AMI %s: removed from the registry; session closed", server_ip)
        for server_ip, endpoint in sorted(endpoints.items()):
            current = self.sessions.get(server_ip)
            if current is not None and current.endpoint == endpoint:
                continue
            if current is not None:
                log.info("AMI %s: address or credentials changed; reconnecting", server_ip)
                await current.stop()
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

    async def close(self) -> None:
        """Log off and close every session."""
        sessions, self.sessions = self.sessions, {}
        await asyncio.gather(*(s.stop() for s in sessions.values()), return_exceptions=True)
