"""Kamailio's dispatcher follows the balancer: real Kamailio (the shipped config), real SIP.

Each simulated Asterisk is a server's AMI side; a SIPp UAS on its own loopback port is its SIP
side; a SIPp UAC sends INVITEs to Kamailio, and each UAS counts what it received. Kamailio's own
OPTIONS probing runs at the shipped settings throughout, and every UAS keeps answering OPTIONS:
whatever takes a destination out here is the balancer, not the probing.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from kamailio_helpers import (
    flags_are,
    flags_by_duid,
    rig,
    rpc,
    run_uac,
    settled,
    until,
    weights_by_duid,
)

from balancer.config import AgentsConfig, KamailioEndpoint, KamailioSet
from balancer.db.url import DatabaseUrl

pytestmark = pytest.mark.slow


async def test_server_down_gets_no_new_invite_after_the_balancer_marks_it(
    database_url: DatabaseUrl, sim_factory: object, tmp_path: Path
) -> None:
    async with rig(database_url, sim_factory, tmp_path) as r:
        await settled(r)
        await run_uac(r.kam, 150)
        before = r.counts()
        assert all(n > 0 for n in before), before

        # Killed AMI: the session closes, the server is DOWN at once.
        await r.sims[1].stop()
        await until(lambda: flags_are(r.kam, ast2="IX"), "ast2 inactive after its AMI died")
        # Its SIP side still answers OPTIONS, and the flag carries no probing bit: the balancer
        # took it out (Kamailio's probing would neither have found it nor cleared its P).
        assert r.uases[1].process is not None and r.uases[1].process.poll() is None
        await asyncio.sleep(0.3)  # let SIPp's trace catch up with anything in flight
        marked = r.counts()
        await run_uac(r.kam, 300)
        after = r.counts()
        assert after[1] == marked[1], f"ast2 got INVITEs after it was marked: {marked} -> {after}"
        assert after[0] + after[2] - marked[0] - marked[2] == 300

        # Hung AMI (connected, silent): DOWN after the missed heartbeats, then out.
        r.sims[2].set_unresponsive(True)
        await until(lambda: flags_are(r.kam, ast3="IX"), "ast3 inactive after its AMI hung")
        await asyncio.sleep(0.3)
        marked = r.counts()
        await run_uac(r.kam, 100)
        after = r.counts()
        assert after[1:] == marked[1:], f"a DOWN server got INVITEs: {marked} -> {after}"
        assert after[0] - marked[0] == 100

        # It answers again: UP, active, and INVITEs reach it again.
        r.sims[2].set_unresponsive(False)
        await until(lambda: flags_are(r.kam, ast3="AP"), "ast3 active again once UP")
        back = r.counts()
        await run_uac(r.kam, 100)
        assert r.counts()[2] > back[2]


async def test_invites_follow_spare_capacity_shares(
    database_url: DatabaseUrl, sim_factory: object, tmp_path: Path
) -> None:
    async with rig(database_url, sim_factory, tmp_path, max_trunks=(50, 40, 30)) as r:
        for _ in range(10):
            r.sims[0].add_trunk_channel("alpha")
            r.sims[1].add_trunk_channel("alpha")
        # spare 40 / 30 / 30 -> shares 40 % / 30 % / 30 %
        await settled(r, {"ast1": 40, "ast2": 30, "ast3": 30})
        start = r.counts()
        await run_uac(r.kam, 1000, rate=200)
        await asyncio.sleep(0.3)
        got = [n - s for n, s in zip(r.counts(), start, strict=True)]
        assert sum(got) == 1000, got
        for received, share in zip(got, (400, 300, 300), strict=True):
            assert abs(received - share) <= share * 0.10, f"{got} vs 400/300/300 (±10 %)"

        # Capacity moves: 20 more lines on ast1 -> spare 20/30/30 -> weights follow (a reload).
        reloads = r.daemon.kamailio.publishers[0].stats.reloads  # type: ignore[union-attr]
        for _ in range(20):
            r.sims[0].add_trunk_channel("alpha")
        await until(
            lambda: weights_by_duid(r.kam.url) == {"ast1": 25, "ast2": 38, "ast3": 37},
            "weights after ast1 filled up",
        )
        publisher = r.daemon.kamailio.publishers[0]  # type: ignore[union-attr]
        assert publisher.stats.reloads > reloads

        # Churn within the hysteresis (±1 line, < 5 points) reloads nothing.
        reloads = publisher.stats.reloads
        for _ in range(5):
            uid = r.sims[1].add_trunk_channel("alpha")
            await asyncio.sleep(0.15)
            await r.sims[1].hangup(uid)
            await asyncio.sleep(0.15)
        assert publisher.stats.reloads == reloads

        # Many big moves in a burst: reloads stay within the bound (30/min = one per 2 s).
        started = time.monotonic()
        uids = []
        for _ in range(8):
            uids += [r.sims[2].add_trunk_channel("alpha") for _ in range(3)]
            await asyncio.sleep(0.2)
        for uid in uids:
            await r.sims[2].hangup(uid)
        await asyncio.sleep(0.5)
        elapsed = time.monotonic() - started
        assert publisher.stats.reloads - reloads <= 1 + elapsed / 2.0
        assert publisher.stats.reloads_deferred > 0


async def test_weight_algorithm_9_and_an_agent_facing_set(
    database_url: DatabaseUrl, sim_factory: object, tmp_path: Path
) -> None:
    sets = (KamailioSet(1, "trunks"), KamailioSet(2, "agents", ("10.10.0.1", "10.10.0.2")))
    async with rig(
        database_url,
        sim_factory,
        tmp_path,
        max_trunks=(50, 40, 30),
        kamailio_defines={"DS_ALG": "9"},
        config_changes={"agents": AgentsConfig(default_capacity=10)},
        algorithm=9,
        sets=sets,
    ) as r:
        for _ in range(10):
            r.sims[0].add_trunk_channel("alpha")
            r.sims[1].add_trunk_channel("alpha")
        for ext in ("101", "102", "103", "104"):
            r.sims[0].add_agent_channel(ext)
        r.sims[1].add_agent_channel("101")
        await until(
            lambda: weights_by_duid(r.kam.url, 1, "WEIGHT") == {"ast1": 40, "ast2": 30, "ast3": 30},
            "set 1 weights by spare trunks",
        )
        # Set 2 faces agents: spare seats 6 and 9 of 10 -> 40 % / 60 %.
        await until(
            lambda: weights_by_duid(r.kam.url, 2, "WEIGHT") == {"ast1": 40, "ast2": 60},
            "set 2 weights by spare agent seats",
        )
        assert flags_by_duid(r.kam.url, 2) == {"ast1": "AP", "ast2": "AP"}
        start = r.counts()
        await run_uac(r.kam, 300)
        await asyncio.sleep(0.3)
        got = [n - s for n, s in zip(r.counts(), start, strict=True)]
        for received, share in zip(got, (120, 90, 90), strict=True):
            assert abs(received - share) <= share * 0.10, f"{got} vs 120/90/90 (±10 %)"

        # Algorithm 9 gives an inactive destination's slots to its neighbour: the weights are
        # spread over the active ones again (a reload), in every set the server is in.
        await r.sims[2].stop()
        await until(
            lambda: weights_by_duid(r.kam.url, 1, "WEIGHT") == {"ast1": 57, "ast2": 43, "ast3": 0},
            "weights over the active destinations",
        )
        assert flags_by_duid(r.kam.url)["ast3"] == "IX"
        print(
            "DEBUG",
            flags_by_duid(r.kam.url),
            weights_by_duid(r.kam.url, 1, "WEIGHT"),
            r.kam.list_file.read_text(),
        )
        start = r.counts()
        await run_uac(r.kam, 200)
        await asyncio.sleep(0.3)
        got = [n - s for n, s in zip(r.counts(), start, strict=True)]
        assert got[2] == 0, got
        for received, share in zip(got[:2], (114, 86), strict=True):
            assert abs(received - share) <= share * 0.10, f"{got} vs 114/86 (±10 %)"


async def test_drain_undrain_and_an_admin_disabled_destination(
    database_url: DatabaseUrl, sim_factory: object, tmp_path: Path
) -> None:
    async with rig(database_url, sim_factory, tmp_path) as r:
        await settled(r)
        store = r.daemon.store

        await store.set_drained("10.10.0.1", True)
        await until(lambda: flags_are(r.kam, ast1="IX"), "ast1 inactive when drained")
        await asyncio.sleep(0.3)
        drained = r.counts()
        await run_uac(r.kam, 100)
        assert r.counts()[0] == drained[0], "a drained server got INVITEs"

        await store.set_drained("10.10.0.1", False)
        await until(lambda: flags_are(r.kam, ast1="AP"), "ast1 active when undrained")
        back = r.counts()
        await run_uac(r.kam, 150)
        assert r.counts()[0] - back[0] >= 30, "an undrained server got (almost) no INVITEs"

        # An admin disables ast2 by hand: it stays disabled through drains, health changes,
        # verify passes and reloads (weights moved by new trunk lines).
        rpc(r.kam.url, "dispatcher.set_state", "d", 1, r.uases[1].uri)
        await store.set_drained("10.10.0.2", True)
        await asyncio.sleep(0.6)
        await store.set_drained("10.10.0.2", False)
        reloads = r.daemon.kamailio.publishers[0].stats.reloads  # type: ignore[union-attr]
        for _ in range(15):
            r.sims[0].add_trunk_channel("alpha")
        await until(
            lambda: r.daemon.kamailio.publishers[0].stats.reloads > reloads,  # type: ignore[union-attr]
            "a reload after ast1's capacity moved",
        )
        await asyncio.sleep(1.0)  # two verify passes
        assert flags_by_duid(r.kam.url)["ast2"] == "DX"
        assert " 4 0 duid=ast2;" in r.kam.list_file.read_text()
        disabled = r.counts()
        await run_uac(r.kam, 100)
        assert r.counts()[1] == disabled[1], "an admin-disabled destination got INVITEs"

        # Re-enabled by hand: the balancer manages it again.
        rpc(r.kam.url, "dispatcher.set_state", "ap", 1, r.uases[1].uri)
        await store.set_drained("10.10.0.2", True)
        await until(lambda: flags_are(r.kam, ast2="IX"), "ast2 managed again after re-enabling")


async def test_kamailio_restart_and_outage_restore_the_desired_state(
    database_url: DatabaseUrl, sim_factory: object, tmp_path: Path
) -> None:
    # A second endpoint that accepts connections and never answers: the HA partner is hung.
    hung_clients: list[asyncio.StreamWriter] = []

    async def swallow(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung_clients.append(writer)

    hung = await asyncio.start_server(swallow, "127.0.0.1", 0)
    hung_port = hung.sockets[0].getsockname()[1]
    hung_endpoint = KamailioEndpoint(
        "kam-hung", f"http://127.0.0.1:{hung_port}/RPC", str(tmp_path / "hung.list")
    )
    try:
        async with rig(
            database_url, sim_factory, tmp_path, extra_endpoints=(hung_endpoint,), balance=True
        ) as r:
            sync = r.daemon.kamailio
            assert sync is not None
            live, stuck = sync.publishers
            await settled(r)
            await r.sims[1].stop()
            # The hung partner times out on every pass; the live one is not held up by it.
            await until(lambda: flags_are(r.kam, ast2="IX"), "ast2 inactive beside a hung peer")
            await until(lambda: stuck.stats.failures > 0, "the hung peer times out")
            assert live.stats.failures == 0 and stuck.stats.last_ok_at is None

            # Restart: Kamailio loads the file the balancer wrote: ast2 is inactive at once.
            r.kam.restart()
            assert flags_by_duid(r.kam.url)["ast2"] == "IX"
            await until(lambda: flags_are(r.kam, ast1="AP", ast2="IX", ast3="AP"), "after restart")
            await until(lambda: live.stats.restarts_seen >= 1, "restart noticed")

            # Outage: Kamailio gone; the daemon keeps balancing and tracking.
            r.kam.stop()
            cycles = r.daemon.cycle.cycles  # type: ignore[union-attr]
            await r.daemon.store.set_drained("10.10.0.3", True)
            await until(lambda: live.stats.failures >= 2, "publishing fails while it is down")
            await until(lambda: r.daemon.cycle.cycles > cycles + 2, "balance cycles go on")  # type: ignore[union-attr]
            state = await r.daemon.store.server("10.10.0.3")
            assert state is not None and state.drained
            # The file still follows the desired state while nobody can load it.
            await until(lambda: " 1 0 duid=ast3;" in r.kam.list_file.read_text(), "file current")

            # It comes back with no list at all (a new box): the first publish restores all.
            r.kam.list_file.write_text("")
            r.kam.start()
            await until(
                lambda: flags_are(r.kam, ast1="AP", ast2="IX", ast3="IX"), "restored after outage"
            )
            assert weights_by_duid(r.kam.url) == {"ast1": 34, "ast2": 33, "ast3": 33}
            start = r.counts()
            await run_uac(r.kam, 60)
            got = [n - s for n, s in zip(r.counts(), start, strict=True)]
            assert got[0] == 60 and got[1:] == [0, 0], got
    finally:
        for writer in hung_clients:
            writer.close()
        hung.close()
        await hung.wait_closed()
