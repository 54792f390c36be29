"""Server health as data: the session's view combined with VICIdial's own liveness (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from balancer.config import HealthConfig
from balancer.store.base import Health


@dataclass(frozen=True)
class HealthVerdict:
    health: Health
    reason: str


def effective_health(
    ami_health: Health, ami_reason: str, updater_age_s: float | None, config: HealthConfig
) -> HealthVerdict:
    """DOWN when AMI says so or VICIdial's server_updater is stale; otherwise AMI's view.

    A server with no server_updater row at all is judged by AMI alone: VICIdial writes that row,
    and a cluster that has not yet started its updater should not look dead for it.
    """
    if ami_health is Health.DOWN:
        return HealthVerdict(Health.DOWN, ami_reason)
    if (
        config.check_server_updater
        and updater_age_s is not None
        and updater_age_s > config.server_updater_max_age_s
    ):
        return HealthVerdict(
            Health.DOWN,
            f"server_updater stale ({updater_age_s:.0f}s > {config.server_updater_max_age_s:g}s)",
        )
    return HealthVerdict(ami_health, ami_reason)
