"""The leader fence in the database: the lease row, and the condition every balance write carries.

VICIdial's tables have no transactions, so "check the lease, then commit" cannot fence anything.
Instead the lease is a row of ``vb_leader`` (name, epoch, holder, expires_at), and every write a
leader makes for a balance call carries ``EXISTS (SELECT 1 FROM vb_leader WHERE name = .. AND
epoch = ..)`` in the SAME statement. Taking the lease over bumps the epoch, so from that moment
no statement of an older leader can write anything, whatever its clocks, pauses or Redis say.
``vb_leader`` is MyISAM: a statement reading it holds its table read lock until it ends, so the
takeover's UPDATE is ordered strictly before or after each fenced write (docs/FENCING.md).

Expiry uses the database's own clock (NOW(6)); the only time a holder's clock matters is how
often it renews (a third of the TTL).
"""

from __future__ import annotations

from dataclasses import dataclass

from balancer.db.connection import Connection
from balancer.errors import BalancerError

BALANCE_LEASE = "balance"


class FenceLost(BalancerError):
    """A fenced write found another epoch in vb_leader: this process no longer leads."""


@dataclass(frozen=True)
class LeaderFence:
    """The lease a writer holds: every fenced statement is conditional on this epoch."""

    name: str
    epoch: int

    @property
    def exists(self) -> str:
        """The condition to AND into a write's WHERE (its parameters: `params`)."""
        return "EXISTS (SELECT 1 FROM vb_leader WHERE name = %s AND epoch = %s)"

    @property
    def source(self) -> str:
        """FROM/WHERE for an ``INSERT ... SELECT <values>`` that inserts only while we lead."""
        return "FROM vb_leader WHERE name = %s AND epoch = %s"

    @property
    def params(self) -> tuple[str, int]:
        return (self.name, self.epoch)


@dataclass(frozen=True)
class LeaseRow:
    """The lease row as the database has it now."""

    epoch: int
    holder: str
    remaining_s: float  # until expiry by the database's clock (negative: expired)


def _micros(seconds: float) -> int:
    return max(1, int(seconds * 1_000_000))


def ensure_row(conn: Connection, name: str = BALANCE_LEASE) -> None:
    """Create the lease row (epoch 0, expired) if it is missing."""
    with conn.cursor() as cur:
        cur.execute(
            "INSERT IGNORE INTO vb_leader (name, epoch, holder, expires_at)"
            " VALUES (%s, 0, '', '1970-01-01 00:00:01')",
            (name,),
        )


def read(conn: Connection, name: str = BALANCE_LEASE) -> LeaseRow | None:
    """The lease row, or None when it does not exist yet."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT epoch, holder, TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at)"
            " FROM vb_leader WHERE name = %s",
            (name,),
        )
        row = cur.fetchone()
    if row is None:
        return None
    return LeaseRow(int(row[0]), str(row[1] or ""), int(row[2]) / 1_000_000)


def take(conn: Connection, holder: str, ttl_s: float, name: str = BALANCE_LEASE) -> int | None:
    """Take the lease if it has expired (a new epoch) or renew it if ``holder`` has it.

    Returns the epoch now held, or None when another holder's lease is still running.
    """
    ensure_row(conn, name)
    ttl = _micros(ttl_s)
    with conn.cursor() as cur:
        renewed = cur.execute(
            "UPDATE vb_leader SET expires_at = NOW(6) + INTERVAL %s MICROSECOND"
            " WHERE name = %s AND holder = %s",
            (ttl, name, holder),
        )
        if not renewed:
            cur.execute(
                "UPDATE vb_leader SET epoch = epoch + 1, holder = %s, taken_at = NOW(6),"
                " expires_at = NOW(6) + INTERVAL %s MICROSECOND"
                " WHERE name = %s AND expires_at < NOW(6)",
                (holder, ttl, name),
            )
        cur.execute("SELECT epoch, holder FROM vb_leader WHERE name = %s", (name,))
        row = cur.fetchone()
    if row is None or str(row[1]) != holder:
        return None
    return int(row[0])


def renew(conn: Connection, fence: LeaderFence, holder: str, ttl_s: float) -> bool:
    """Extend the lease we hold; False when the epoch moved on (someone took over)."""
    with conn.cursor() as cur:
        return bool(
            cur.execute(
                "UPDATE vb_leader SET expires_at = NOW(6) + INTERVAL %s MICROSECOND"
                " WHERE name = %s AND epoch = %s AND holder = %s",
                (_micros(ttl_s), fence.name, fence.epoch, holder),
            )
        )


def release(conn: Connection, fence: LeaderFence, holder: str) -> bool:
    """Let the lease expire now (the epoch stays: a standby takes it with the next one)."""
    with conn.cursor() as cur:
        return bool(
            cur.execute(
                "UPDATE vb_leader SET expires_at = '1970-01-01 00:00:01', holder = ''"
                " WHERE name = %s AND epoch = %s AND holder = %s",
                (fence.name, fence.epoch, holder),
            )
        )


def holds(conn: Connection, fence: LeaderFence) -> bool:
    """Whether ``fence``'s epoch is still the lease's (a plain read, for diagnostics)."""
    row = read(conn, fence.name)
    return row is not None and row.epoch == fence.epoch
