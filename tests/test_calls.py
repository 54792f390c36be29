"""One balance call's rows (through the real executor), finish_cycle and log_decisions on a real
MariaDB in strict mode, with VICIdial's stock engines (MyISAM/MEMORY)."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import balance_seed as seed
import pytest
from balance_seed import CALL_TABLES, EXAMPLE_NOW
from conftest import execute, fetchall

from balancer.balance.executor import LOST_LEADERSHIP
from balancer.balance.fields import caller_code, dial_prefix, next_called_since_last_reset
from balancer.balance.model import CampaignPlan, Placement, Plan
from balancer.carriers.routing import CarrierPick, NoCarrier, PlacedCall
from balancer.db.calls import CallResult
from balancer.db.connection import Connection
from balancer.db.cycle_log import Decision, finish_cycle, log_decisions
from balancer.db.fence import FenceLost

CODE = "V1221354560000100001"  # VICIDIAL.md's example caller code


place = seed.place


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
        "state": "",  # VICIdial records the state only with 24-hour call limits on
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
    # the lead's own status is left as it was: VICIdial's balance cycle changes only the hopper
    assert (lead["status"], lead["user"], lead["called_count"]) == ("NEW", "VDAD", 1)
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
        # VICIdial counts a candidate only when it is LONGER than 6 characters: a 6-character
        # campaign CID, a short list override or a 5-digit custom phrase is passed over, and with
        # none left the CID type and outbound_cid are empty and Callerid is the bare caller code
        ("", "N", "", "123456", CODE, "", ""),
        ("55555", "N", "", "0000000000", f'"{CODE}" <0000000000>', "0000000000", "CAMPAIGN_CID"),
        (
            "",
            "Y",
            "cid 55555",
            "0000000000",
            f'"{CODE}" <0000000000>',
            "0000000000",
            "CAMPAIGN_CID",
        ),
        ("123456", "Y", "12345", "12345", CODE, "", ""),
        ("1234567", "Y", "3125557777", "0000000000", f'"{CODE}" <1234567>', "1234567", "LIST_CID"),
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
    logged = seed.one(db, "SELECT outbound_cid FROM vicidial_dial_log")["outbound_cid"]
    assert logged == (callerid if kind else "")


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
    assert (lead["called_count"], lead["user"], lead["status"]) == (5, "VDAD", "NEW")


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


def test_24_hour_calls_record_the_state_only_with_the_limit_on(db: Connection) -> None:
    seed.example(db)
    seed.insert(db, "system_settings", call_limit_24hour="1")
    assert place(db) is not None
    assert seed.one(db, "SELECT state FROM vicidial_lead_24hour_calls")["state"] == "IL"


def test_the_vdacnote_names_the_balancing_host(db: Connection) -> None:
    """VICIdial writes its own host's server_ip in the VDACnote, not the target server's."""
    seed.example(db)
    plan = seed.one_placement("CAMP1", "10.10.0.1")
    report = seed.execute_plan(db, plan, host_server_ip="10.10.9.9")
    assert report.total_placed == 1
    note = manager_row(db)["cmd_line_k"]
    assert note == "VDACnote: CAMP1|100001|1|3125550001|OUTBALANCE|NONE|50|10.10.9.9|CAMPAIGN_CID"


@pytest.mark.parametrize(
    ("alt_phone", "digits"), [("773-555-0199", "7735550199"), ("(312)5550101", "3125550101")]
)
def test_alt_numbers_are_dialed_as_digits_only(db: Connection, alt_phone: str, digits: str) -> None:
    seed.server(db)
    seed.campaign(db, auto_alt_dial="ALT_ONLY")
    seed.lead_list(db)
    seed.lead(db, alt_phone=alt_phone)
    seed.hopper(db, alt_dial="ALT")
    result = place(db)
    assert result is not None and result.phone_number == digits
    row = manager_row(db)
    assert row["cmd_line_d"] == f"Channel: Local/91{digits}@default"
    assert f"|1|{digits}|OUTBALANCE|ALT|" in row["cmd_line_k"]
    assert seed.one(db, "SELECT phone_number FROM vicidial_auto_calls")["phone_number"] == digits
    assert (
        seed.one(db, "SELECT phone_number FROM vicidial_lead_24hour_calls")["phone_number"]
        == digits
    )
    daily = seed.one(db, "SELECT phone_number FROM vicidial_phone_number_call_daily_counts")
    assert daily["phone_number"] == digits


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
    report = seed.execute_plan(db, seed.one_placement("CAMP1", "10.10.0.1"))
    assert [r.lead_id for r in report.results] == [100001] and report.orphans_deleted == 2
    orphans = fetchall(db, "SELECT lead_id FROM vb_decision_log WHERE outcome = 'orphan_deleted'")
    assert sorted(int(str(r["lead_id"])) for r in orphans) == [998, 999]
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
    assert hop["status"] == "READY" and hop["user"] in (None, "")  # VICIdial's hopper writes ''

    lead = lead_row(db)
    assert (lead["status"], lead["user"], lead["called_count"]) == ("NEW", None, 0)
    assert (lead["called_since_last_reset"], lead["last_local_call_time"]) == ("N", None)


def expire(db: Connection) -> None:
    """Make the current lease expire now (as if its holder stopped renewing it)."""
    execute(db, "UPDATE vb_leader SET expires_at = NOW(6) - INTERVAL 1 SECOND")


def test_a_lease_taken_over_writes_nothing(db: Connection) -> None:
    seed.example(db)
    old = seed.take_lease(db, "old-leader")
    expire(db)
    new = seed.take_lease(db, "new-leader")
    assert new.epoch == old.epoch + 1
    report = seed.execute_plan(db, seed.one_placement("CAMP1", "10.10.0.1"), fence=old)
    assert report.stopped == LOST_LEADERSHIP and report.results == []
    _assert_untouched(db)
    assert seed.count(db, "vb_decision_log") == 0
    assert place(db, fence=new) is not None  # the lead is still there to dial


def test_every_write_of_a_call_is_fenced(db: Connection) -> None:
    """A statement run under an old epoch writes nothing, whatever table it is for."""
    seed.example(db)
    old = seed.take_lease(db, "old-leader")
    expire(db)
    seed.take_lease(db, "new-leader")
    from balancer.db import calls, leads

    ids = seed.snapshot(db).hopper_ids["CAMP1"]
    with pytest.raises(FenceLost):
        leads.claim(db, old, "CAMP1", ids, "VB122135456000100001")
    snap = seed.snapshot(db)
    dial = calls.Dial(
        snap.servers["10.10.0.1"],
        snap.campaigns["CAMP1"],
        seed_lead(db),
        "V1221354560000100001",
        EXAMPLE_NOW,
        "913125550001",
        "3125550001",
        "MAIN",
    )
    for write in (
        lambda: calls.insert_auto_call(db, old, dial),
        lambda: calls.insert_dial_logs(db, old, dial),
        lambda: calls.insert_originate(db, old, dial, "CAMPAIGN_CID"),
    ):
        with pytest.raises(FenceLost):
            write()
    _assert_untouched(db)


def seed_lead(db: Connection) -> Any:
    from balancer.db.leads import read_lead

    lead = read_lead(db, 100001)
    assert lead is not None
    return lead


@pytest.fixture
def failing_dial_log(db: Connection) -> Iterator[None]:
    """A trigger that makes every vicidial_dial_log insert fail (the call's second write)."""
    execute(
        db,
        "CREATE TRIGGER vb_test_fail_dial_log BEFORE INSERT ON vicidial_dial_log FOR EACH ROW"
        " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'",
    )
    try:
        yield
    finally:
        execute(db, "DROP TRIGGER IF EXISTS vb_test_fail_dial_log")


def test_an_error_mid_call_is_repaired_at_once(db: Connection, failing_dial_log: None) -> None:
    seed.example(db)
    report = seed.execute_plan(db, seed.one_placement("CAMP1", "10.10.0.1"))
    assert report.results == [] and report.errors and "injected failure" in report.errors[0]
    assert report.repaired.undone == [100001]  # the auto-call row written before went again
    _assert_untouched(db)
    execute(db, "DROP TRIGGER vb_test_fail_dial_log")
    assert place(db) is not None  # connection still usable, lead READY again


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

    fence = seed.take_lease(db)
    finish_cycle(db, fence, {"CAMP1": 3, "CAMP2": -2}, False, [101, 101], ["CAMP1"], EXAMPLE_NOW)
    assert stats() == {"CAMP1": 3, "CAMP3": 4}  # VICIdial updates rows; CAMP2 has none
    lists = fetchall(db, "SELECT list_id, list_lastcalldate FROM vicidial_lists ORDER BY list_id")
    assert [r["list_lastcalldate"] for r in lists] == [EXAMPLE_NOW, None]
    dates = fetchall(
        db, "SELECT campaign_id, campaign_calldate FROM vicidial_campaigns ORDER BY campaign_id"
    )
    assert [r["campaign_calldate"] for r in dates] == [EXAMPLE_NOW, None, None]

    # under a lease taken over: nothing changes
    expire(db)
    seed.take_lease(db, "another")
    finish_cycle(db, fence, {"CAMP3": 1}, True, [102], ["CAMP2"], EXAMPLE_NOW)
    assert stats() == {"CAMP1": 3, "CAMP3": 4}
    assert seed.count(db, "vicidial_lists", "list_lastcalldate IS NOT NULL") == 1

    # VICIdial step 2: every campaign back to 0
    finish_cycle(db, seed.take_lease(db, "another"), {}, True, [], [], EXAMPLE_NOW)
    assert stats() == {"CAMP1": 0, "CAMP3": 0}


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
    assert log_decisions(db, rows) == 2  # an operator's or keeper's rows: no epoch
    fence = seed.take_lease(db)
    assert log_decisions(db, rows[:1], fence) == 1  # a leader's rows carry its epoch
    got = fetchall(db, "SELECT * FROM vb_decision_log ORDER BY id")
    assert [r["epoch"] for r in got] == [None, None, fence.epoch]
    expire(db)
    seed.take_lease(db, "another")
    with pytest.raises(FenceLost):
        log_decisions(db, rows, fence)
    assert seed.count(db, "vb_decision_log") == 3
    got = got[:2]
    for row in got:
        del row["id"], row["epoch"]
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


# --------------------------------------------------------------------------- carrier routing


class Router:
    """A carrier router answering by number (and, with ``servers``, by number@server)."""

    def __init__(
        self,
        picks: dict[str, CarrierPick | NoCarrier | None],
        default: CarrierPick | NoCarrier | None = None,
        servers: dict[str, str] | None = None,
    ) -> None:
        self.picks, self.default, self.servers = picks, default, servers
        self.placed_calls: list[PlacedCall] = []

    def choose(
        self, server_ip: str, phone_code: str, number: str, exclude: Collection[str] = ()
    ) -> CarrierPick | NoCarrier | None:
        key = f"{number}@{server_ip}"
        if self.servers is not None and key in self.servers:
            return self.picks[self.servers[key]]
        return self.picks.get(number, self.default)

    def placed(self, call: PlacedCall) -> None:
        self.placed_calls.append(call)


BETA = CarrierPick("beta", "8", "default", 1)
NONE_LEFT = NoCarrier("default", "route 'default': alpha: open on 10.10.0.1; beta: at its cap")


def place_routed(db: Connection, router: Router, plan: Plan | None = None) -> Any:
    return seed.execute_plan(db, plan or seed.one_placement("CAMP1", "10.10.0.1"), router=router)


def test_the_carrier_prefix_replaces_the_campaign_and_list_prefix(db: Connection) -> None:
    seed.server(db)
    seed.campaign(db, dial_prefix="9")
    seed.lead_list(db, dial_prefix="77")
    seed.lead(db)
    seed.hopper(db)
    router = Router({}, BETA)
    [result] = place_routed(db, router).results
    assert result.dial_string == "813125550001" and result.channel == "Local/813125550001@default"
    assert (result.carrier_id, result.route, result.phone_code) == ("beta", "default", "1")
    assert manager_row(db)["cmd_line_d"] == "Channel: Local/813125550001@default"
    assert [c.caller_code for c in router.placed_calls] == [result.caller_code]


def test_not_routed_keeps_the_campaign_prefix(db: Connection) -> None:
    seed.example(db)
    [result] = place_routed(db, Router({}, None)).results
    assert result.dial_string == "913125550001" and result.carrier_id == ""


def test_a_lead_no_carrier_can_take_stays_in_the_hopper(db: Connection) -> None:
    seed.server(db)
    seed.campaign(db)
    seed.lead_list(db)
    seed.leads(db, 3)
    execute(db, "UPDATE vicidial_hopper SET priority = 9 WHERE lead_id = 1")
    report = place_routed(db, Router({"3125550001": NONE_LEFT}, BETA))
    assert [r.lead_id for r in report.results] == [2] and report.unrouted == 1
    [logged] = fetchall(
        db, "SELECT lead_id, reason FROM vb_decision_log WHERE outcome = 'no_carrier'"
    )
    assert logged["lead_id"] == 1 and NONE_LEFT.reason in str(logged["reason"])
    hop = seed.one(db, "SELECT status, user FROM vicidial_hopper WHERE lead_id = 1")
    assert hop == {"status": "READY", "user": ""}  # back as VICIdial's hopper writes it
    assert lead_row(db, 1)["status"] == "NEW"


def test_no_carrier_for_any_lead_writes_nothing(db: Connection) -> None:
    seed.example(db)
    report = place_routed(db, Router({}, NONE_LEFT))
    assert report.results == [] and report.unrouted == 1
    _assert_untouched(db)


def test_scan_of_unroutable_leads_is_bounded(db: Connection) -> None:
    seed.server(db)
    seed.campaign(db)
    seed.lead_list(db)
    seed.leads(db, 8)
    report = place_routed(db, Router({}, NONE_LEFT))
    assert report.results == [] and report.unrouted == 5
    assert seed.count(db, "vicidial_hopper", "status = 'READY'") == 8


def test_no_carrier_on_the_planned_server_tries_the_other_planned_server(db: Connection) -> None:
    seed.server(db, "10.10.0.1")
    seed.server(db, "10.10.0.2", ext_context="other")
    seed.campaign(db)
    seed.lead_list(db)
    seed.lead(db)
    seed.hopper(db)
    router = Router(
        {"none": NONE_LEFT, "beta": BETA},
        servers={"3125550001@10.10.0.1": "none", "3125550001@10.10.0.2": "beta"},
    )
    first = Placement("CAMP1", "10.10.0.1", 1, "fill 1")
    second = Placement("CAMP1", "10.10.0.2", 1, "fill 1")
    campaign = CampaignPlan("CAMP1", 2, 0, 2, True, (first, second), ())
    plan = Plan("live", False, campaigns=(campaign,), pace_ms=0.0, sequence=(first, second))
    [result] = place_routed(db, router, plan).results
    assert result.server_ip == "10.10.0.2" and result.channel == "Local/813125550001@other"
    row = manager_row(db)
    assert (row["server_ip"], row["cmd_line_c"]) == ("10.10.0.2", "Context: other")
    assert seed.one(db, "SELECT server_ip FROM vicidial_auto_calls")["server_ip"] == "10.10.0.2"
