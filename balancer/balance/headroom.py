"""The executor's bookkeeping within one cycle, pure: which hopper rows to claim next, and which
other planned server still has a line to spare for a call no carrier can take where planned."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from balancer.balance.model import DbSnapshot, Plan
from balancer.balance.rules import Counts, allowed_lines, free_lines


class HopperPool:
    """One campaign's READY hopper rows of the snapshot, in VICIdial's order, during a cycle.

    A row is *gone* once dialed, deleted or found taken by another dialer; *held* while this
    cycle has it claimed. Rows put back (a carrier could not take them) are available again.
    """

    def __init__(self, hopper_ids: Iterable[int]) -> None:
        self.order = list(hopper_ids)
        self.gone: set[int] = set()
        self.held: set[int] = set()

    def next(self, count: int, exclude: Collection[int] = ()) -> list[int]:
        """Up to ``count`` candidates: not gone, not held, not in ``exclude``."""
        picked: list[int] = []
        for hopper_id in self.order:
            if len(picked) >= count:
                break
            if hopper_id in self.gone or hopper_id in self.held or hopper_id in exclude:
                continue
            picked.append(hopper_id)
        return picked

    @property
    def exhausted(self) -> bool:
        """Every row is gone: the campaign's hopper is empty for the rest of the cycle."""
        return all(i in self.gone for i in self.order)

    def hold(self, hopper_ids: Iterable[int]) -> None:
        self.held.update(hopper_ids)

    def drop(self, hopper_ids: Iterable[int]) -> None:
        """Dialed, deleted or taken by someone else: never a candidate again this cycle."""
        for hopper_id in hopper_ids:
            self.held.discard(hopper_id)
            self.gone.add(hopper_id)

    def release(self, hopper_ids: Iterable[int]) -> None:
        """Put back READY: a candidate again (for servers that did not refuse it)."""
        for hopper_id in hopper_ids:
            self.held.discard(hopper_id)


class Headroom:
    """Lines a server has left for one more call of a campaign this cycle, by the planner's own
    rules (allowed and free lines from the snapshot, with every call planned this cycle counted):
    where a call no carrier can take on its planned server may go instead."""

    def __init__(self, plan: Plan, snapshot: DbSnapshot) -> None:
        self.snapshot = snapshot
        self.counts = Counts.of(snapshot)
        self.planned: dict[tuple[str, str], int] = {}
        self.on_server: dict[str, int] = {}
        self.servers: dict[str, list[str]] = {}  # campaign -> its servers in plan order
        for campaign in plan.campaigns:
            for placement in campaign.placements:
                key = (placement.campaign_id, placement.server_ip)
                self.planned[key] = self.planned.get(key, 0) + placement.calls
                ip = placement.server_ip
                self.on_server[ip] = self.on_server.get(ip, 0) + placement.calls
                order = self.servers.setdefault(placement.campaign_id, [])
                if ip not in order:
                    order.append(ip)

    def spare(self, campaign_id: str, server_ip: str) -> int:
        server = self.snapshot.servers.get(server_ip)
        if server is None:
            return 0
        allowed, _ = allowed_lines(self.counts, server, campaign_id)
        free, _ = free_lines(self.counts, server, None, False, self.on_server.get(server_ip, 0))
        return min(allowed - self.planned.get((campaign_id, server_ip), 0), free)

    def alternates(self, campaign_id: str, server_ip: str) -> list[str]:
        """The campaign's other planned servers with a line to spare, in plan order."""
        return [
            ip
            for ip in self.servers.get(campaign_id, ())
            if ip != server_ip and self.spare(campaign_id, ip) > 0
        ]

    def moved(self, campaign_id: str, from_ip: str, to_ip: str) -> None:
        """One planned call went to ``to_ip`` instead of ``from_ip``."""
        for ip, step in ((from_ip, -1), (to_ip, 1)):
            key = (campaign_id, ip)
            self.planned[key] = self.planned.get(key, 0) + step
            self.on_server[ip] = self.on_server.get(ip, 0) + step
