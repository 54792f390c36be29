"""place_call, finish_cycle and log_decisions on a real MariaDB (strict mode)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import balance_seed as seed
import pymysql
import pytest
from balance_seed import CALL_TABLES, EXAMPLE_NOW
from conftest import execute, fetchall

from balancer.balance.fields import caller_code, dial_prefix, next_called_since_last_reset
from balancer.carriers.routing import CarrierPick, NoCarrier
from balancer.db.calls import CallResult, CycleContext, Unrouted, place_call
from balancer.db.connection import Connection, connect
from balancer.db.cycle_log import Decision, finish_cycle, log_decisions
from balancer.db.url import DatabaseUrl

CODE = "V1221354560000100001"  # VICIDIAL.md's example caller code


def place(
    db: Connection,
    *,
    now: datetime = EXAMPLE_NOW,
    dst: bool = False,
    server_ip: str = "10.10.0.1",
    campaign_id: str = "CAMP1",
    before_commit: Callable[[], bool] = lambda: True,
) -> CallResult | None:
    snap = seed.snapshot(db)
    cycle = CycleContext(now=now, dst=dst, cycle_id="c1")
    return place_call(
        db, snap.servers[server_ip], snap.campaigns[campaign_id], cycle, before_commit
    )


def manager_row(db: Connection) -> dict[str, Any]:
    return seed.one(db, "SELECT * FROM vicidial_manager")


def lead_row(db: Connection, lead_id: int = 100001) -> dict[str, Any]:
    return seed.one(db, "SELECT * FROM vicidial_list WHERE lead_id = %s", lead_id)


# --------------------------------------------------------------------------- pure field rules


@pytest.mark.parametrize(
    ("now", "lead_id", "code"),
    [
        (EXAMPLE_NOW, 100001, CODE),
        (datetime(2025, 12, 31, 23, 59, 58), 7, "V2312359580000000007"),
        (datetime(2025, 3, 5, 4, 3, 2), 4294967295, "V3050403024294967295"),
    ],
)
def test_caller_code(now: datetime, lead_id: int, code: str) -> None:
    assert caller_code(now, lead_id) == code
    assert len(code) == 20


@pytest.mark.parametrize(
    ("before", "after"),
    [("N", "Y"), ("", "Y"), ("D", "Y"), ("Y", "Y1"), ("Y1", "Y2"), ("Y9", "Y10"), ("Y10", "Y10")],
)
def test_next_called_since_last_reset(before: str, after: str) -> None:
    assert next_called_since_last_reset(before) == after


@pytest.mark.parametrize(
    ("list_prefix", "campaign_prefix", "prefix"),
    [
        ("", "9", "9"),
        ("8", "9", "8"),
        ("", "", "9"),
        ("", "x", ""),
        ("7X", "9", ""),
        ("", "77", "77"),
    ],
)
def test_dial_prefix(list_prefix: str, campaign_prefix: str, prefix: str) -> None:
    assert dial_prefix(list_prefix, campaign_prefix) == prefix


# --------------------------------------------------------------------------- the example call


def test_example_call_writes_exactly_what_vicidial_writes(db: Connection) -> None:
    seed.example(db)
    result = place(db)
    assert result is not None
    row = manager_row(db)
    assert row == {
        "man_id": result.man_id,
        "uniqueid": "",
        "entry_date": EXAMPLE_NOW,
        "status": "NEW",
        "response": "N",
        "server_ip": "10.10.0.1",
        "channel": "",
        "action": "Originate",
        "callerid": CODE,
        "cmd_line_b": "Exten: 138368",
        "cmd_line_c": "Context: default",
        "cmd_line_d": "Channel: Local/913125550001@default",
        "cmd_line_e": "Priority: 1",
        "cmd_line_f": f'Callerid: "{CODE}" <0000000000>',
        "cmd_line_g": "Timeout: 60000",
        "cmd_line_h": "",
        "cmd_line_i": "",
        "cmd_line_j": "",
        "cmd_line_k": "VDACnote: "
        "CAMP1|100001|1|3125550001|OUTBALANCE|NONE|50|10.10.0.1|CAMPAIGN_CID",
    }
    auto = seed.one(db, "SELECT * FROM vicidial_auto_calls")
    del auto["last_update_time"]
    assert auto == {
        "auto_call_id": result.auto_call_id,
        "server_ip": "10.10.0.1",
        "campaign_id": "CAMP1",
        "status": "SENT",
        "lead_id": 100001,
        "uniqueid": None,
        "callerid": CODE,
        "channel": None,
        "phone_code": "1",
        "phone_number": "3125550001",
        "call_time": EXAMPLE_NOW,
        "call_type": "OUTBALANCE",
        "stage": "START",
        "alt_dial": "NONE",
        "queue_priority": 50,
    }
    assert seed.one(db, "SELECT * FROM vicidial_dial_log") == {
        "caller_code": CODE,
        "lead_id": 100001,
        "server_ip": "10.10.0.1",
        "call_date": EXAMPLE_NOW,
        "extension": "138368",
        "channel": "Local/913125550001@default",
        "context": "default",
        "timeout": 60000,
        "outbound_cid": f'"{CODE}" <0000000000>',
        "sip_hangup_cause": 0,
        "sip_hangup_reason": "",
        "uniqueid": "",
    }
    assert seed.one(db, "SELECT * FROM vicidial_dial_cid_log") == {
        "caller_code": CODE,
        "call_date": EXAMPLE_NOW,
        "call_type": "OUTBALANCE",
        "call_alt": "NONE",
        "outbound_cid": "0000000000",
        "outbound_cid_type": "CAMPAIGN_CID",
    }
    assert seed.one(db, "SELECT * FROM vicidial_lead_24hour_calls") == {
        "lead_id": 100001,
        "list_id": 101,
        "call_date": EXAMPLE_NOW,
        "phone_number": "3125550001",
        "phone_code": "1",
        "state": "IL",
        "call_type": "AUTO",
    }
    assert seed.one(db, "SELECT * FROM vicidial_lead_call_daily_counts") == {
        "lead_id": 100001,
        "list_id": 101,
        "called_count_total": 1,
        "called_count_auto": 1,
        "called_count_manual": 0,
        "modify_date": EXAMPLE_NOW,
    }
    assert seed.one(db, "SELECT * FROM vicidial_phone_number_call_daily_counts") == {
        "phone_number": "3125550001",
        "called_count": 1,
        "modify_date": EXAMPLE_NOW,
    }
    lead = lead_row(db)
    assert (lead["status"], lead["user"], lead["called_count"]) == ("INCALL", "VDAD", 1)
    assert lead["called_since_last_reset"] == "Y"
    assert lead["last_local_call_time"] == EXAMPLE_NOW  # server and lead both at -5.00
    assert seed.count(db, "vicidial_hopper") == 0
    assert result == CallResult(
        lead_id=100001,
        list_id=101,
        caller_code=CODE,
        man_id=result.man_id,
        auto_call_id=result.auto_call_id,
        server_ip="10.10.0.1",
        campaign_id="CAMP1",
        dial_string="913125550001",
        channel="Local/913125550001@default",
        cid_type="CAMPAIGN_CID",
        orphans_deleted=(),
        phone_number="3125550001",
        alt_dial="NONE",
        phone_code="1",
    )
    # the hopper is empty now
    assert place(db) is None
    assert seed.count(db, "vicidial_manager") == 1


def test_strict_mode_long_values_are_cut_to_their_columns(db: Connection) -> None:
    seed.server(db, "10.10.100.200", ext_context="a-long-context-name1")
    seed.campaign(
        db,
        "LONGCAMP",
        auto_alt_dial="ALT_AND_ADDR3",
        queue_priority=-99,
        campaign_cid="12345678901234567890",
    )
    seed.lead_list(db, 101, "LONGCAMP", dial_prefix="12345678901234567890")
    seed.lead(
        db,
        4294967295,
        101,
        "123456789012345678",
        phone_code="1234567890",
        address3="tel " + "9" * 30,
    )
    seed.hopper(db, 4294967295, "LONGCAMP", alt_dial="ADDR3")
    result = place(db, server_ip="10.10.100.200", campaign_id="LONGCAMP")
    assert result is not None
    assert result.phone_number == "9" * 30
    row = manager_row(db)
    assert row["cmd_line_d"] == (
        "Channel: Local/12345678901234567890" + "1234567890" + "9" * 30 + "@a-long-context-name1"
    )
    assert len(row["cmd_line_k"]) <= 100 and row["cmd_line_k"].startswith("VDACnote: LONGCAMP|")
    assert seed.one(db, "SELECT phone_number FROM vicidial_auto_calls")["phone_number"] == "9" * 18


# --------------------------------------------------------------------------- field variants


@pytest.mark.parametrize(
    ("list_prefix", "campaign_prefix", "omit", "channel"),
    [
        ("", "9", "N", "Local/913125550001@default"),  # campaign prefix
        ("77", "9", "N", "Local/7713125550001@default"),  # the list's prefix wins
        ("", "", "N", "Local/913125550001@default"),  # empty campaign prefix: '9'
        ("", "x", "N", "Local/13125550001@default"),  # 'x' means no prefix
        ("8X", "9", "N", "Local/13125550001@default"),  # 'X' in the list prefix too
        ("", "9", "Y", "Local/93125550001@default"),  # omit_phone_code
    ],
)
def test_dial_string(
    db: Connection, list_prefix: str, campaign_prefix: str, omit: str, channel: str
) -> None:
    seed.server(db)
    seed.campaign(db, dial_prefix=campaign_prefix, omit_phone_code=omit)
    seed.lead_list(db, dial_prefix=list_prefix)
    seed.lead(db)
    seed.hopper(db)
    result = place(db)
    assert result is not None and result.channel == channel
    assert manager_row(db)["cmd_line_d"] == f"Channel: {channel}"
    assert seed.one(db, "SELECT channel FROM vicidial_dial_log")["channel"] == channel


@pytest.mark.parametrize(
    ("override", "custom", "phrase", "campaign_cid", "callerid", "cid", "kind"),
    [
        ("3125550000", "N", "", "0000000000", f'"{CODE}" <3125550000>', "3125550000", "LIST_CID"),
        (
            "",
            "Y",
            "cid: (312) 555-7777",
            "0000000000",
            f'"{CODE}" <3125557777>',
            "3125557777",
            "CUSTOM_CID",
        ),
        (
            "",
            "N",
            "3125557777",
            "0000000000",
            f'"{CODE}" <0000000000>',
            "0000000000",
            "CAMPAIGN_CID",
        ),
        ("", "Y", "none", "0000000000", f'"{CODE}" <0000000000>', "0000000000", "CAMPAIGN_CID"),
        ("", "N", "", "1234567", f'"{CODE}" <1234567>', "1234567", "CAMPAIGN_CID"),
        ("", "N", "", "123456", CODE, "123456", "CAMPAIGN_CID"),  # 6 chars: bare caller code
        ("55555", "N", "", "0000000000", CODE, "55555", "LIST_CID"),
    ],
)
def test_caller_id(
    db: Connection,
    override: str,
    custom: str,
    phrase: str,
    campaign_cid: str,
    callerid: str,
    cid: str,
    kind: str,
) -> None:
    seed.server(db)
    seed.campaign(db, use_custom_cid=custom, campaign_cid=campaign_cid)
    seed.lead_list(db, campaign_cid_override=override)
    seed.lead(db, security_phrase=phrase)
    seed.hopper(db)
    result = place(db)
    assert result is not None and result.cid_type == kind
    row = manager_row(db)
    assert row["cmd_line_f"] == f"Callerid: {callerid}"
    assert row["cmd_line_k"].endswith(f"|{kind}")
    cid_log = seed.one(db, "SELECT outbound_cid, outbound_cid_type FROM vicidial_dial_cid_log")
    assert cid_log == {"outbound_cid": cid, "outbound_cid_type": kind}
    assert seed.one(db, "SELECT outbound_cid FROM vicidial_dial_log")["outbound_cid"] == callerid


@pytest.mark.parametrize(
    ("version", "vdad_exten", "exten"),
    [
        ("13.38.3-vici", "8368", "138368"),
        ("18.21.0", "8368", "138368"),
        ("12.0", "8368", "138368"),
        ("11.25.3", "8368", "8368"),
        ("1.4.21.2", "8368", "8368"),
        ("", "8368", "8368"),
        ("13.38.3-vici", "", "138365"),  # empty campaign exten: the server's answer_transfer_agent
        ("1.4.21.2", "", "8365"),
    ],
)
def test_exten(db: Connection, version: str, vdad_exten: str, exten: str) -> None:
    seed.server(db, asterisk_version=version)
    seed.campaign(db, campaign_vdad_exten=vdad_exten)
    seed.lead_list(db)
    seed.lead(db)
    seed.hopper(db)
    assert place(db) is not None
    assert manager_row(db)["cmd_line_b"] == f"Exten: {exten}"
    assert seed.one(db, "SELECT extension FROM vicidial_dial_log")["extension"] == exten


@pytest.mark.parametrize(("dial_timeout", "ms"), [(0, 60000), (4, 60000), (5, 5000), (30, 30000)])
def test_timeout(db: Connection, dial_timeout: int, ms: int) -> None:
    seed.server(db)
    seed.campaign(db, dial_timeout=dial_timeout)
    seed.lead_list(db)
    seed.lead(db)
    seed.hopper(db)
    assert place(db) is not None
    assert manager_row(db)["cmd_line_g"] == f"Timeout: {ms}"
    assert seed.one(db, "SELECT timeout FROM vicidial_dial_log")["timeout"] == ms


@pytest.mark.parametrize(
    ("alt_dial", "auto_alt_dial", "number", "stored_alt"),
    [
        ("ALT", "ALT_ONLY", "3125552222", "ALT"),
        ("ALT", "ALT_AND_ADDR3", "3125552222", "ALT"),
        ("ALT", "NONE", "3125550001", "ALT"),  # campaign does not dial alternates
        ("ADDR3", "ADDR3_ONLY", "3125553333", "ADDR3"),
        ("ADDR3", "ALT_ONLY", "3125550001", "ADDR3"),
        ("NONE", "ALT_AND_ADDR3", "3125550001", "NONE"),
        ("", "NONE", "3125550001", "MAIN"),  # empty alt_dial is stored as MAIN
    ],
)
def test_alternate_numbers(
    db: Connection, alt_dial: str, auto_alt_dial: str, number: str, stored_alt: str
) -> None:
    seed.server(db)
    seed.campaign(db, auto_alt_dial=auto_alt_dial)
    seed.lead_list(db)
    seed.lead(db, alt_phone="3125552222", address3="(312) 555-3333 ext")
    seed.hopper(db, alt_dial=alt_dial)
    result = place(db)
    assert result is not None and result.phone_number == number
    row = manager_row(db)
    assert row["cmd_line_d"] == f"Channel: Local/91{number}@default"
    assert row["cmd_line_k"] == (
        f"VDACnote: CAMP1|100001|1|{number}|OUTBALANCE|{stored_alt}|50|10.10.0.1|CAMPAIGN_CID"
    )
    auto = seed.one(db, "SELECT phone_number, alt_dial FROM vicidial_auto_calls")
    assert auto == {"phone_number": number, "alt_dial": stored_alt}
    assert seed.one(db, "SELECT call_alt FROM vicidial_dial_cid_log")["call_alt"] == stored_alt
    assert seed.count(db, "vicidial_phone_number_call_daily_counts", "phone_number = %s", number)


@pytest.mark.parametrize(
    ("before", "after"),
    [("N", "Y"), ("D", "Y"), ("Y", "Y1"), ("Y1", "Y2"), ("Y9", "Y10"), ("Y10", "Y10")],
)
def test_lead_update(db: Connection, before: str, after: str) -> None:
    seed.server(db)
    seed.campaign(db)
    seed.lead_list(db)
    seed.lead(db, called_since_last_reset=before, called_count=4, user="someone")
    seed.hopper(db)
    assert place(db) is not None
    lead = lead_row(db)
    assert lead["called_since_last_reset"] == after
    assert (lead["called_count"], lead["user"], lead["status"]) == (5, "VDAD", "INCALL")


@pytest.mark.parametrize(
    ("server_gmt", "lead_gmt", "dst", "shift_h"),
    [
        ("-5.00", "-5.00", False, 0),
        ("-5.00", "-8.00", False, -3),  # lead three hours west
        ("-5.00", "-8.00", True, -4),  # DST adds an hour to the server's offset
        ("-5.00", "-7.00", True, -3),  # (a lead's gmt_offset_now already includes its DST)
        ("-5.00", "5.50", False, 10.5),
        ("1.00", "-5.00", True, -7),
    ],
)
def test_last_local_call_time(
    db: Connection, server_gmt: str, lead_gmt: str, dst: bool, shift_h: float
) -> None:
    seed.server(db, local_gmt=server_gmt)
    seed.campaign(db)
    seed.lead_list(db)
    seed.lead(db, gmt_offset_now=lead_gmt)
    seed.hopper(db)
    assert place(db, dst=dst) is not None
    assert lead_row(db)["last_local_call_time"] == EXAMPLE_NOW + timedelta(hours=shift_h)
    # every other timestamp is the cycle's own
    assert manager_row(db)["entry_date"] == EXAMPLE_NOW


def test_daily_counts_increment(db: Connection) -> None:
    seed.server(db)
    seed.campaign(db)
    seed.lead_list(db)
    seed.lead(db)
    seed.hopper(db)
    seed.hopper(db)  # the same lead twice: two calls
    seed.insert(
        db,
        "vicidial_phone_number_call_daily_counts",
        phone_number="3125550001",
        called_count=2,
        modify_date=datetime(2024, 1, 22, 8, 0),
    )
    assert place(db) is not None
    assert seed.one(db, "SELECT * FROM vicidial_lead_call_daily_counts") == {
        "lead_id": 100001,
        "list_id": 101,
        "called_count_total": 1,
        "called_count_auto": 1,
        "called_count_manual": 0,
        "modify_date": EXAMPLE_NOW,
    }
    execute(db, "UPDATE vicidial_lead_call_daily_counts SET called_count_manual = 3")
    later = EXAMPLE_NOW + timedelta(seconds=5)
    assert place(db, now=later) is not None
    assert seed.one(db, "SELECT * FROM vicidial_lead_call_daily_counts") == {
        "lead_id": 100001,
        "list_id": 101,
        "called_count_total": 2,
        "called_count_auto": 2,
        "called_count_manual": 3,
        "modify_date": later,
    }
    assert seed.one(db, "SELECT * FROM vicidial_phone_number_call_daily_counts") == {
        "phone_number": "3125550001",
        "called_count": 4,
        "modify_date": later,
    }
    assert seed.count(db, "vicidial_lead_24hour_calls", "lead_id = 100001") == 2
    assert lead_row(db)["called_count"] == 2


# --------------------------------------------------------------------------- claiming


def test_claims_in_priority_then_hopper_order(db: Connection) -> None:
    seed.server(db)
    seed.campaign(db)
    seed.campaign(db, "CAMP2")
    seed.lead_list(db)
    ids = seed.leads(db, 5)
    execute(db, "UPDATE vicidial_hopper SET priority = 5 WHERE lead_id IN (3, 4)")
    execute(db, "UPDATE vicidial_hopper SET status = 'HOLD' WHERE lead_id = 1")
    seed.lead(db, 77, phone_number="3125550077")
    seed.hopper(db, 77, "CAMP2", priority=99)  # another campaign's lead
    dialed = []
    while (result := place(db)) is not None:
        dialed.append(result.lead_id)
    assert dialed == [3, 4, 2, 5]
    assert ids == [1, 2, 3, 4, 5]
    assert seed.count(db, "vicidial_hopper") == 2  # the HOLD row and CAMP2's


def test_orphan_hopper_row_is_deleted_and_replaced(db: Connection, caplog: Any) -> None:
    seed.example(db)
    execute(db, "UPDATE vicidial_hopper SET priority = 1")
    seed.hopper(db, 999, priority=9)  # its lead does not exist
    seed.hopper(db, 998, priority=8)  # nor this one
    result = place(db)
    assert result is not None
    assert result.lead_id == 100001 and result.orphans_deleted == (999, 998)
    assert seed.count(db, "vicidial_hopper") == 0
    assert seed.count(db, "vicidial_manager") == 1
    assert "lead 999" in caplog.text and "lead 998" in caplog.text


def test_only_orphans_left_means_empty_and_they_are_deleted(db: Connection) -> None:
    seed.server(db)
    seed.campaign(db)
    seed.hopper(db, 999)
    assert place(db) is None
    assert seed.count(db, "vicidial_hopper") == 0
    for table in CALL_TABLES:
        assert seed.count(db, table) == 0, table


def test_empty_hopper(db: Connection) -> None:
    seed.server(db)
    seed.campaign(db)
    assert place(db) is None
    assert seed.count(db, "vicidial_manager") == 0


def _assert_untouched(db: Connection) -> None:
    for table in CALL_TABLES:
        assert seed.count(db, table) == 0, table
    hop = seed.one(db, "SELECT status, user FROM vicidial_hopper")
    assert hop == {"status": "READY", "user": None}
    lead = lead_row(db)
    assert (lead["status"], lead["user"], lead["called_count"]) == ("NEW", None, 0)
    assert (lead["called_since_last_reset"], lead["last_local_call_time"]) == ("N", None)


def test_fence_refusal_writes_nothing(db: Connection) -> None:
    seed.example(db)
    asked = []

    def refuse() -> bool:
        # the whole call is written (and still uncommitted) when the fence is asked
        with db.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM vicidial_manager")
            asked.append(cur.fetchone()[0])
        return False

    assert place(db, before_commit=refuse) is None
    assert asked == [1]
    _assert_untouched(db)
    assert place(db) is not None  # the lead is still there to dial


@pytest.fixture
def failing_dial_log(db: Connection) -> Iterator[None]:
    """A trigger that makes every vicidial_dial_log insert fail (mid-transaction)."""
    execute(
        db,
        "CREATE TRIGGER vb_test_fail_dial_log BEFORE INSERT ON vicidial_dial_log FOR EACH ROW"
        " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'",
    )
    try:
        yield
    finally:
        execute(db, "DROP TRIGGER IF EXISTS vb_test_fail_dial_log")


def test_error_mid_transaction_rolls_back_everything(
    db: Connection, failing_dial_log: None
) -> None:
    seed.example(db)
    with pytest.raises(pymysql.err.MySQLError, match="injected failure"):
        place(db)
    _assert_untouched(db)
    execute(db, "DROP TRIGGER vb_test_fail_dial_log")
    assert place(db) is not None  # connection still usable, lead still READY


def test_two_balancers_never_claim_the_same_lead(db: Connection, database_url: DatabaseUrl) -> None:
    seed.server(db)
    seed.campaign(db)
    seed.lead_list(db)
    seed.leads(db, 60)
    snap = seed.snapshot(db)
    server, campaign = snap.servers["10.10.0.1"], snap.campaigns["CAMP1"]
    cycle = CycleContext(now=EXAMPLE_NOW, dst=False, cycle_id="race")
    start = threading.Barrier(2)
    dialed: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def balancer(index: int) -> None:
        conn = connect(database_url)
        try:
            start.wait()
            for _ in range(50):
                result = place_call(conn, server, campaign, cycle)
                if result is None:
                    break
                dialed[index].append(result.lead_id)
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=balancer, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    every = dialed[0] + dialed[1]
    assert len(every) == 60 and sorted(every) == list(range(1, 61))
    assert dialed[0] and dialed[1]  # both took part
    assert seed.count(db, "vicidial_manager") == 60
    assert seed.count(db, "vicidial_hopper") == 0
    rows = fetchall(db, "SELECT lead_id, COUNT(*) AS n FROM vicidial_auto_calls GROUP BY lead_id")
    assert {int(str(r["n"])) for r in rows} == {1} and len(rows) == 60


# --------------------------------------------------------------------------- after the cycle


def test_finish_cycle(db: Connection) -> None:
    for camp in ("CAMP1", "CAMP2", "CAMP3"):
        seed.campaign(db, camp)
    seed.lead_list(db, 101)
    seed.lead_list(db, 102)
    seed.insert(db, "vicidial_campaign_stats", campaign_id="CAMP1", balance_trunk_fill=9)
    seed.insert(db, "vicidial_campaign_stats", campaign_id="CAMP3", balance_trunk_fill=4)

    def stats() -> dict[str, int]:
        rows = fetchall(db, "SELECT campaign_id, balance_trunk_fill FROM vicidial_campaign_stats")
        return {str(r["campaign_id"]): int(str(r["balance_trunk_fill"])) for r in rows}

    assert finish_cycle(db, {"CAMP1": 3, "CAMP2": -2}, False, [101, 101], ["CAMP1"], EXAMPLE_NOW)
    assert stats() == {"CAMP1": 3, "CAMP2": 0, "CAMP3": 4}
    lists = fetchall(db, "SELECT list_id, list_lastcalldate FROM vicidial_lists ORDER BY list_id")
    assert [r["list_lastcalldate"] for r in lists] == [EXAMPLE_NOW, None]
    dates = fetchall(
        db, "SELECT campaign_id, campaign_calldate FROM vicidial_campaigns ORDER BY campaign_id"
    )
    assert [r["campaign_calldate"] for r in dates] == [EXAMPLE_NOW, None, None]

    # a refused fence: nothing changes
    assert not finish_cycle(db, {"CAMP3": 1}, True, [102], ["CAMP2"], EXAMPLE_NOW, lambda: False)
    assert stats() == {"CAMP1": 3, "CAMP2": 0, "CAMP3": 4}
    assert seed.count(db, "vicidial_lists", "list_lastcalldate IS NOT NULL") == 1

    # VICIdial step 2: every campaign back to 0
    assert finish_cycle(db, {}, True, [], [], EXAMPLE_NOW)
    assert stats() == {"CAMP1": 0, "CAMP2": 0, "CAMP3": 0}


def test_log_decisions(db: Connection) -> None:
    at = datetime(2024, 1, 22, 13, 54, 56, 123000)
    rows = [
        Decision(
            at,
            "cycle-1",
            "balance",
            "CAMP1",
            100001,
            "10.10.0.1",
            "",
            "placed",
            "fill 2 of 3",
            '{"man_id":1}',
        ),
        Decision(
            at, "cycle-1", "balance", "CAMP2", None, "10.10.0.2", "alpha", "skipped", "x" * 300
        ),
    ]
    assert log_decisions(db, []) == 0
    assert log_decisions(db, rows) == 2
    got = fetchall(db, "SELECT * FROM vb_decision_log ORDER BY id")
    for row in got:
        del row["id"]
    assert got == [
        {
            "decided_at": at,
            "cycle_id": "cycle-1",
            "kind": "balance",
            "campaign_id": "CAMP1",
            "lead_id": 100001,
            "server_ip": "10.10.0.1",
            "carrier_id": "",
            "outcome": "placed",
            "reason": "fill 2 of 3",
            "details": '{"man_id":1}',
        },
        {
            "decided_at": at,
            "cycle_id": "cycle-1",
            "kind": "balance",
            "campaign_id": "CAMP2",
            "lead_id": None,
            "server_ip": "10.10.0.2",
            "carrier_id": "alpha",
            "outcome": "skipped",
            "reason": "x" * 255,
            "details": None,
        },
    ]


def test_decimal_offsets_are_read_exactly(db: Connection) -> None:
    seed.server(db, local_gmt="5.75")
    assert seed.snapshot(db).servers["10.10.0.1"].local_gmt == float(Decimal("5.75"))


def test_a_deadlock_is_retried(db: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    import balancer.db.calls as calls

    seed.example(db)
    real = calls._place_once
    attempts: list[int] = []

    def deadlock_once(*args: Any) -> CallResult | None:
        attempts.append(1)
        if len(attempts) == 1:
            raise pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock")
        return real(*args)

    monkeypatch.setattr(calls, "_place_once", deadlock_once)
    assert place(db) is not None and len(attempts) == 2

    attempts.clear()

    def always_deadlocked(*args: Any) -> CallResult | None:
        attempts.append(1)
        raise pymysql.err.OperationalError(1213, "Deadlock found when trying to get lock")

    monkeypatch.setattr(calls, "_place_once", always_deadlocked)
    with pytest.raises(pymysql.err.OperationalError):
        place(db)
    assert len(attempts) == 3  # then it gives up and the caller stops the cycle


# --------------------------------------------------------------------------- carrier routing


def route_by_number(
    picks: dict[str, CarrierPick | NoCarrier | None],
    default: CarrierPick | NoCarrier | None = None,
    servers: dict[str, str] | None = None,
) -> Callable[[str, str, str], CarrierPick | NoCarrier | None]:
    """A chooser answering by number (and, with ``servers``, by number@server)."""

    def choose(server_ip: str, phone_code: str, number: str) -> CarrierPick | NoCarrier | None:
        key = f"{number}@{server_ip}"
        if servers is not None and key in servers:
            return picks[servers[key]]
        return picks.get(number, default)

    return choose


BETA = CarrierPick("beta", "8", "default", 1)
NONE_LEFT = NoCarrier("default", "route 'default': alpha: open on 10.10.0.1; beta: at its cap")


def place_routed(db: Connection, chooser: Any, **kw: Any) -> Any:
    snap = seed.snapshot(db)
    cycle = CycleContext(now=EXAMPLE_NOW, dst=False, cycle_id="c1")
    alternates = [snap.servers[ip] for ip in kw.pop("alternates", ())]
    return place_call(
        db,
        snap.servers["10.10.0.1"],
        snap.campaigns["CAMP1"],
        cycle,
        route=chooser,
        alternates=alternates,
        **kw,
    )


def test_the_carrier_prefix_replaces_the_campaign_and_list_prefix(db: Connection) -> None:
    seed.server(db)
    seed.campaign(db, dial_prefix="9")
    seed.lead_list(db, dial_prefix="77")
    seed.lead(db)
    seed.hopper(db)
    result = place_routed(db, route_by_number({}, BETA))
    assert isinstance(result, CallResult)
    assert result.dial_string == "813125550001" and result.channel == "Local/813125550001@default"
    assert (result.carrier_id, result.route, result.phone_code) == ("beta", "default", "1")
    assert manager_row(db)["cmd_line_d"] == "Channel: Local/813125550001@default"


def test_not_routed_keeps_the_campaign_prefix(db: Connection) -> None:
    seed.example(db)
    result = place_routed(db, route_by_number({}, None))
    assert isinstance(result, CallResult)
    assert result.dial_string == "913125550001" and result.carrier_id == ""


def test_a_lead_no_carrier_can_take_stays_in_the_hopper(db: Connection) -> None:
    seed.server(db)
    seed.campaign(db)
    seed.lead_list(db)
    seed.leads(db, 3)
    execute(db, "UPDATE vicidial_hopper SET priority = 9, user = 'keepme' WHERE lead_id = 1")
    first_hopper = seed.one(db, "SELECT hopper_id FROM vicidial_hopper WHERE lead_id = 1")
    result = place_routed(db, route_by_number({"3125550001": NONE_LEFT}, BETA))
    assert isinstance(result, CallResult) and result.lead_id == 2
    assert [(u.lead_id, u.hopper_id, u.route) for u in result.unrouted] == [
        (1, first_hopper["hopper_id"], "default")
    ]
    assert result.unrouted[0].reason == NONE_LEFT.reason
    hop = seed.one(db, "SELECT status, user FROM vicidial_hopper WHERE lead_id = 1")
    assert hop == {"status": "READY", "user": "keepme"}  # exactly as it was
    assert lead_row(db, 1)["status"] == "NEW"
    # passed over when asked to skip it: the next call takes lead 3
    again = place_routed(
        db, route_by_number({"3125550001": NONE_LEFT}, BETA), skip={first_hopper["hopper_id"]}
    )
    assert isinstance(again, CallResult) and again.lead_id == 3 and again.unrouted == ()


def test_no_carrier_for_any_lead_writes_nothing(db: Connection) -> None:
    seed.example(db)
    result = place_routed(db, route_by_number({}, NONE_LEFT))
    assert isinstance(result, Unrouted) and result.exhausted
    assert [u.lead_id for u in result.leads] == [100001]
    _assert_untouched(db)


def test_scan_of_unroutable_leads_is_bounded(db: Connection) -> None:
    seed.server(db)
    seed.campaign(db)
    seed.lead_list(db)
    seed.leads(db, 8)
    result = place_routed(db, route_by_number({}, NONE_LEFT))
    assert isinstance(result, Unrouted) and not result.exhausted
    assert len(result.leads) == 5
    assert seed.count(db, "vicidial_hopper", "status = 'READY'") == 8


def test_no_carrier_on_the_planned_server_tries_the_alternates(db: Connection) -> None:
    seed.server(db, "10.10.0.1")
    seed.server(db, "10.10.0.2", ext_context="other")
    seed.campaign(db)
    seed.lead_list(db)
    seed.lead(db)
    seed.hopper(db)
    chooser = route_by_number(
        {"none": NONE_LEFT, "beta": BETA},
        servers={"3125550001@10.10.0.1": "none", "3125550001@10.10.0.2": "beta"},
    )
    result = place_routed(db, chooser, alternates=["10.10.0.2"])
    assert isinstance(result, CallResult)
    assert result.server_ip == "10.10.0.2" and result.channel == "Local/813125550001@other"
    row = manager_row(db)
    assert (row["server_ip"], row["cmd_line_c"]) == ("10.10.0.2", "Context: other")
    assert seed.one(db, "SELECT server_ip FROM vicidial_auto_calls")["server_ip"] == "10.10.0.2"
