"""Schema install and check against a real MariaDB, each case in its own scratch database."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql
import pytest

from balancer.db import schema
from balancer.db.connection import Connection, connect, connect_server
from balancer.db.url import DatabaseUrl, parse_database_url
from balancer.errors import DatabaseError

VICIDIAL_TABLES = {
    "servers",
    "system_settings",
    "vicidial_campaign_server_stats",
    "vicidial_server_trunks",
    "vicidial_auto_calls",
    "vicidial_manager",
    "vicidial_campaigns",
    "vicidial_campaign_stats",
    "vicidial_live_agents",
    "vicidial_hopper",
    "vicidial_list",
    "vicidial_lists",
    "vicidial_dial_log",
    "phones",
    "phones_alias",
    "server_updater",
    "vicidial_conferences",
    "vicidial_confbridges",
    "vicidial_server_carriers",
    "vicidial_dial_cid_log",
    "vicidial_lead_24hour_calls",
    "vicidial_lead_call_daily_counts",
    "vicidial_phone_number_call_daily_counts",
}
BALANCER_TABLES = {
    "vb_decision_log",
    "vb_login_flags",
    "vb_schema_version",
    "vb_call_retries",
    "vb_leader",
}
# VICIdial's own engines (its install creates MyISAM, then alters the live tables to MEMORY).
MEMORY_TABLES = {
    "vicidial_hopper",
    "vicidial_auto_calls",
    "vicidial_campaign_server_stats",
    "server_updater",
}


def _server_url() -> DatabaseUrl:
    url = parse_database_url(
        os.environ.get("VB_TEST_DATABASE_URL", "mysql://vbtest:vbtest@127.0.0.1:3306/vb_test"),
        "VB_TEST_DATABASE_URL",
    )
    assert url.host in ("127.0.0.1", "::1", "localhost"), "tests only use a loopback database"
    return url


@contextmanager
def _scratch() -> Iterator[Connection]:
    """A connection to a new, empty vb_schema_<random> database, dropped afterwards."""
    url = _server_url()
    name = f"vb_schema_{secrets.token_hex(6)}"
    admin = connect_server(url)
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
        conn = connect(url.with_database(name))
        try:
            yield conn
        finally:
            conn.close()
    finally:
        try:
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            admin.close()


@pytest.fixture
def empty_db() -> Iterator[Connection]:
    """A fresh empty database for one test."""
    with _scratch() as conn:
        yield conn


@pytest.fixture(scope="module")
def installed_db() -> Iterator[tuple[Connection, schema.InstallReport]]:
    """One database with the schema installed, shared by the tests that only add rows."""
    with _scratch() as conn:
        yield conn, schema.install(conn)


@pytest.fixture
def db(installed_db: tuple[Connection, schema.InstallReport]) -> Connection:
    """The shared installed database in plain strict mode (what VICIdial's MariaDB defaults to)."""
    conn = installed_db[0]
    run(conn, "SET SESSION sql_mode='STRICT_TRANS_TABLES'")
    return conn


def run(conn: Connection, sql: str, *params: object) -> int:
    with conn.cursor() as cur:
        return int(cur.execute(sql, params or None))


def rows(conn: Connection, sql: str, *params: object) -> list[dict[str, Any]]:
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute(sql, params or None)
        return list(cur.fetchall())


def tables_of(conn: Connection) -> set[str]:
    sql = "SELECT table_name AS t FROM information_schema.tables WHERE table_schema = DATABASE()"
    return {str(row["t"]) for row in rows(conn, sql)}


# --- parsing sql/ -------------------------------------------------------------------------


def test_expected_tables_cover_every_vicidial_and_balancer_table() -> None:
    tables = schema.expected_tables()
    assert set(tables) == VICIDIAL_TABLES | BALANCER_TABLES
    assert Path(__file__).resolve().parents[1] / "sql" == Path(str(schema.SQL_DIR)).resolve()
    assert tables["vicidial_manager"][:3] == ["man_id", "uniqueid", "entry_date"]
    assert "ASTmgrUSERNAME" in tables["servers"]
    assert tables["vb_login_flags"] == ["server_ip", "set_to", "previous", "reason", "changed_at"]
    # COMMENT clauses with ';' and ',' inside do not break the parse.
    assert tables["vb_decision_log"][-2:] == ["details", "epoch"]


def test_statements_handles_comments_and_quoted_semicolons(tmp_path: Path) -> None:
    path = tmp_path / "x.sql"
    path.write_text(
        "-- a comment; with a semicolon\n"
        "CREATE TABLE IF NOT EXISTS a (x VARCHAR(5) DEFAULT 'a;b' COMMENT \"c;--d\"); # tail; \n"
        "/* block; comment */ CREATE TABLE IF NOT EXISTS `b` (y INT DEFAULT 1--1\n);\n"
        "INSERT INTO a VALUES ('it''s; \\' fine')\n",
        encoding="utf-8",
    )
    assert schema.statements(path) == [
        "CREATE TABLE IF NOT EXISTS a (x VARCHAR(5) DEFAULT 'a;b' COMMENT \"c;--d\")",
        "CREATE TABLE IF NOT EXISTS `b` (y INT DEFAULT 1--1\n)",
        "INSERT INTO a VALUES ('it''s; \\' fine')",
    ]


def test_statements_rejects_an_unterminated_quote(tmp_path: Path) -> None:
    path = tmp_path / "bad.sql"
    path.write_text("CREATE TABLE IF NOT EXISTS a (x VARCHAR(5) DEFAULT 'oops);\n")
    with pytest.raises(DatabaseError, match=r"bad\.sql: unterminated"):
        schema.statements(path)


# --- install --------------------------------------------------------------------------------


def test_install_creates_every_table_with_its_columns(
    installed_db: tuple[Connection, schema.InstallReport],
) -> None:
    conn, report = installed_db
    expected = schema.expected_tables()
    assert sorted(report.created) == sorted(expected)
    assert report.existing == []
    assert tables_of(conn) == set(expected)
    for table, columns in expected.items():
        actual = rows(
            conn,
            "SELECT column_name AS c FROM information_schema.columns"
            " WHERE table_schema = DATABASE() AND table_name = %s ORDER BY ordinal_position",
            table,
        )
        assert [row["c"] for row in actual] == columns, table
    engines = {
        str(row["t"]): str(row["e"])
        for row in rows(
            conn,
            "SELECT table_name AS t, engine AS e FROM information_schema.tables"
            " WHERE table_schema = DATABASE()",
        )
    }
    for table in VICIDIAL_TABLES:
        assert engines[table] == ("MEMORY" if table in MEMORY_TABLES else "MyISAM"), table
    assert engines["vb_leader"] == "MyISAM"  # the fence's table lock (balancer/db/fence.py)
    for table in BALANCER_TABLES - {"vb_leader"}:
        assert engines[table] == "InnoDB", table
    assert schema.check(conn) == []
    assert rows(conn, "SELECT version FROM vb_schema_version ORDER BY version") == [
        {"version": v} for v in range(1, schema.SCHEMA_VERSION + 1)
    ]


def test_install_twice_creates_nothing_and_keeps_rows(db: Connection) -> None:
    run(db, "INSERT INTO servers (server_id, server_ip) VALUES ('twice', '10.9.9.9')")
    run(
        db, "INSERT INTO vb_login_flags (server_ip, set_to, previous) VALUES ('10.9.9.9', 'N', 'Y')"
    )
    version_rows = rows(db, "SELECT * FROM vb_schema_version")
    report = schema.install(db)
    assert report.created == []
    assert sorted(report.existing) == sorted(schema.expected_tables())
    assert rows(db, "SELECT server_id FROM servers WHERE server_ip = '10.9.9.9'") == [
        {"server_id": "twice"}
    ]
    assert len(rows(db, "SELECT * FROM vb_login_flags WHERE server_ip = '10.9.9.9'")) == 1
    assert rows(db, "SELECT * FROM vb_schema_version") == version_rows


def test_existing_table_of_another_shape_is_left_untouched(empty_db: Connection) -> None:
    run(
        empty_db,
        "CREATE TABLE servers (server_id VARCHAR(10) NOT NULL, server_ip VARCHAR(15) NOT NULL,"
        " my_extra INT DEFAULT 7) ENGINE=InnoDB",
    )
    run(empty_db, "INSERT INTO servers (server_id, server_ip) VALUES ('hand', '10.1.1.1')")
    before = rows(empty_db, "SHOW CREATE TABLE servers")

    report = schema.install(empty_db)

    assert report.existing == ["servers"]
    assert "servers" not in report.created
    assert rows(empty_db, "SHOW CREATE TABLE servers") == before
    assert rows(empty_db, "SELECT * FROM servers") == [
        {"server_id": "hand", "server_ip": "10.1.1.1", "my_extra": 7}
    ]
    missing = [
        c for c in schema.expected_tables()["servers"] if c not in ("server_id", "server_ip")
    ]
    problems = schema.check(empty_db)
    assert {(p.table, p.column) for p in problems} == {("servers", c) for c in missing}
    assert all("servers." in p.message and "missing" in p.message for p in problems)


def test_check_reports_exactly_a_missing_column(empty_db: Connection) -> None:
    schema.install(empty_db)
    run(empty_db, "ALTER TABLE vicidial_hopper DROP COLUMN alt_dial")
    problems = schema.check(empty_db)
    assert problems == [
        schema.SchemaProblem(
            "vicidial_hopper", "alt_dial", "column vicidial_hopper.alt_dial is missing"
        )
    ]


def test_check_reports_missing_tables_and_a_manager_without_auto_increment(
    empty_db: Connection,
) -> None:
    schema.install(empty_db)
    run(empty_db, "DROP TABLE server_updater")
    run(empty_db, "DROP TABLE vb_decision_log")
    run(empty_db, "ALTER TABLE vicidial_manager MODIFY man_id INT UNSIGNED NOT NULL")
    problems = schema.check(empty_db)
    assert [(p.table, p.column) for p in problems] == [
        ("vicidial_manager", "man_id"),
        ("server_updater", None),
        ("vb_decision_log", None),
    ]
    assert "AUTO_INCREMENT" in problems[0].message
    assert "server_updater is missing" in problems[1].message

    report = schema.install(empty_db)
    assert sorted(report.created) == ["server_updater", "vb_decision_log"]
    assert "vicidial_manager" in report.existing
    assert [(p.table, p.column) for p in schema.check(empty_db)] == [("vicidial_manager", "man_id")]


def test_table_created_by_someone_else_meanwhile_counts_as_existing(
    empty_db: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema.install(empty_db)
    run(empty_db, "INSERT INTO vicidial_hopper (lead_id, campaign_id) VALUES (9, 'RACE')")
    # As if every table appeared between install's look at information_schema and its CREATE.
    monkeypatch.setattr(schema, "_columns_present", lambda conn, database: {})
    report = schema.install(empty_db)
    assert report.created == []
    assert sorted(report.existing) == sorted(schema.expected_tables())
    assert len(rows(empty_db, "SELECT * FROM vicidial_hopper WHERE campaign_id = 'RACE'")) == 1


def test_check_and_install_need_a_selected_database() -> None:
    conn = connect_server(_server_url())
    try:
        with pytest.raises(DatabaseError, match="no database selected"):
            schema.check(conn)
        with pytest.raises(DatabaseError, match="no database selected"):
            schema.install(conn)
    finally:
        conn.close()


def test_failing_statement_raises_database_error_naming_the_table(
    empty_db: Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vicidial.sql").write_text(
        "CREATE TABLE IF NOT EXISTS vb_good (x INT);\n"
        "CREATE TABLE IF NOT EXISTS vb_broken (x NO_SUCH_TYPE);\n"
    )
    (tmp_path / "balancer.sql").write_text("")
    monkeypatch.setattr(schema, "SQL_DIR", tmp_path)
    with pytest.raises(DatabaseError, match=r"CREATE TABLE vb_broken \(sql/vicidial.sql\) failed"):
        schema.install(empty_db)
    assert tables_of(empty_db) == {"vb_good"}


def test_sql_files_hold_only_create_table_if_not_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vicidial.sql").write_text("DROP TABLE servers;\n")
    (tmp_path / "balancer.sql").write_text("")
    monkeypatch.setattr(schema, "SQL_DIR", tmp_path)
    with pytest.raises(DatabaseError, match="not a CREATE TABLE IF NOT EXISTS statement"):
        schema.expected_tables()


# --- strict-mode writes and VICIdial's defaults ---------------------------------------------


def test_balance_call_writes_succeed_in_strict_mode(db: Connection) -> None:
    assert rows(db, "SELECT @@SESSION.sql_mode AS m") == [{"m": "STRICT_TRANS_TABLES"}]
    run(db, "INSERT INTO servers (server_id, server_ip) VALUES ('strict1', '255.255.255.250')")
    run(
        db,
        "INSERT INTO vicidial_list (list_id, phone_code, phone_number, gmt_offset_now)"
        " VALUES (%s, %s, %s, %s)",
        101,
        "1",
        "3125550001",
        "-5.00",
    )
    lead_id = rows(db, "SELECT LAST_INSERT_ID() AS id")[0]["id"]
    assert lead_id > 0
    run(
        db,
        "INSERT INTO vicidial_hopper (lead_id, campaign_id, status, priority)"
        " VALUES (%s, %s, %s, %s)",
        lead_id,
        "CAMP1",
        "READY",
        5,
    )
    # Claim: the longest server_ip still fits in the 20-character user column.
    assert (
        run(
            db,
            "UPDATE vicidial_hopper SET status = 'QUEUE', user = %s WHERE lead_id = %s",
            "VDFC_255.255.255.250",
            lead_id,
        )
        == 1
    )
    run(
        db,
        "UPDATE vicidial_list SET called_count = called_count + 1,"
        " called_since_last_reset = 'Y10', user = 'VDAD', last_local_call_time = NOW()"
        " WHERE lead_id = %s",
        lead_id,
    )
    caller_code = f"V122135456{lead_id:010d}"
    note = f"VDACnote: CAMP1|{lead_id}|1|3125550001|OUTBALANCE|NONE|50|255.255.255.250|CAMPAIGN_CID"
    run(
        db,
        "INSERT INTO vicidial_manager (uniqueid, entry_date, status, response, server_ip, channel,"
        " action, callerid, cmd_line_b, cmd_line_c, cmd_line_d, cmd_line_e, cmd_line_f,"
        " cmd_line_g, cmd_line_h, cmd_line_i, cmd_line_j, cmd_line_k)"
        " VALUES ('', NOW(), 'NEW', 'N', %s, '', 'Originate', %s, %s, %s, %s, %s, %s, %s,"
        " '', '', '', %s)",
        "255.255.255.250",
        caller_code,
        "Exten: 138368",
        "Context: default",
        "Channel: Local/913125550001@default",
        "Priority: 1",
        f'Callerid: "{caller_code}" <0000000000>',
        "Timeout: 60000",
        note,
    )
    run(
        db,
        "INSERT INTO vicidial_auto_calls (server_ip, campaign_id, status, lead_id, callerid,"
        " phone_code, phone_number, call_time, call_type, alt_dial, queue_priority)"
        " VALUES (%s, 'CAMP1', 'SENT', %s, %s, '1', '3125550001', NOW(), 'OUTBALANCE', 'MAIN', 50)",
        "255.255.255.250",
        lead_id,
        caller_code,
    )
    run(
        db,
        "INSERT INTO vicidial_dial_log (caller_code, lead_id, server_ip, call_date, extension,"
        " channel, timeout, outbound_cid, context)"
        " VALUES (%s, %s, %s, NOW(), '8368', 'Local/913125550001@default', 60000, %s, 'default')",
        caller_code,
        lead_id,
        "255.255.255.250",
        f'"{caller_code}" <0000000000>',
    )
    run(
        db,
        "INSERT INTO vicidial_dial_cid_log (caller_code, call_date, call_type, call_alt,"
        " outbound_cid, outbound_cid_type) VALUES (%s, NOW(), 'OUTBALANCE', 'MAIN', %s, %s)",
        caller_code,
        "0000000000",
        "CAMPAIGN_CID",
    )
    run(
        db,
        "INSERT INTO vicidial_lead_24hour_calls (lead_id, list_id, call_date, phone_number,"
        " phone_code, state, call_type) VALUES (%s, 101, NOW(), '3125550001', '1', 'IL', 'AUTO')",
        lead_id,
    )
    for _ in range(2):
        run(
            db,
            "INSERT INTO vicidial_lead_call_daily_counts (lead_id, list_id, called_count_total,"
            " called_count_auto, modify_date) VALUES (%s, 101, 1, 1, NOW())"
            " ON DUPLICATE KEY UPDATE called_count_total = called_count_total + 1,"
            " called_count_auto = called_count_auto + 1, modify_date = NOW()",
            lead_id,
        )
        run(
            db,
            "INSERT INTO vicidial_phone_number_call_daily_counts (phone_number, called_count,"
            " modify_date) VALUES ('3125550001', 1, NOW())"
            " ON DUPLICATE KEY UPDATE called_count = called_count + 1, modify_date = NOW()",
        )
    run(
        db,
        "INSERT INTO vb_decision_log (cycle_id, kind, campaign_id, lead_id, server_ip, outcome,"
        " reason) VALUES ('c1', 'balance', 'CAMP1', %s, '255.255.255.250', 'placed', 'free lines')",
        lead_id,
    )
    assert run(db, "DELETE FROM vicidial_hopper WHERE lead_id = %s", lead_id) == 1

    manager = rows(db, "SELECT * FROM vicidial_manager WHERE callerid = %s", caller_code)
    assert len(manager) == 1 and manager[0]["man_id"] > 0
    assert manager[0]["cmd_line_k"] == note
    call = rows(db, "SELECT * FROM vicidial_auto_calls WHERE callerid = %s", caller_code)[0]
    assert call["auto_call_id"] > 0 and call["stage"] == "START"
    lead = rows(db, "SELECT * FROM vicidial_list WHERE lead_id = %s", lead_id)[0]
    assert (lead["called_count"], lead["called_since_last_reset"], lead["user"]) == (
        1,
        "Y10",
        "VDAD",
    )
    counts = rows(db, "SELECT * FROM vicidial_lead_call_daily_counts WHERE lead_id = %s", lead_id)
    assert (counts[0]["called_count_total"], counts[0]["called_count_auto"]) == (2, 2)
    assert rows(
        db,
        "SELECT called_count FROM vicidial_phone_number_call_daily_counts"
        " WHERE phone_number = '3125550001'",
    ) == [{"called_count": 2}]
    decided_at = rows(db, "SELECT decided_at FROM vb_decision_log WHERE cycle_id = 'c1'")
    assert decided_at[0]["decided_at"].year >= 2024


def test_strict_mode_rejects_values_outside_the_enums(db: Connection) -> None:
    with pytest.raises(pymysql.err.DataError):
        run(db, "INSERT INTO vicidial_auto_calls (server_ip, call_type) VALUES ('10.0.0.1', 'X')")


def test_server_defaults_match_vicidial(db: Connection) -> None:
    run(db, "INSERT INTO servers (server_id, server_ip) VALUES ('dflt', '10.7.7.7')")
    server = rows(db, "SELECT * FROM servers WHERE server_ip = '10.7.7.7'")[0]
    assert {
        key: server[key]
        for key in (
            "telnet_host",
            "telnet_port",
            "ASTmgrUSERNAME",
            "ASTmgrSECRET",
            "max_vicidial_trunks",
            "balance_trunks_offlimits",
            "vicidial_balance_active",
            "vicidial_balance_rank",
            "active_asterisk_server",
            "active_agent_login_server",
            "routing_prefix",
            "ext_context",
            "answer_transfer_agent",
            "local_gmt",
            "outbound_calls_per_second",
            "conf_engine",
            "active_twin_server_ip",
        )
    } == {
        "telnet_host": "localhost",
        "telnet_port": 5038,
        "ASTmgrUSERNAME": "cron",
        "ASTmgrSECRET": "1234",
        "max_vicidial_trunks": 23,
        "balance_trunks_offlimits": 0,
        "vicidial_balance_active": "N",
        "vicidial_balance_rank": 0,
        "active_asterisk_server": "Y",
        "active_agent_login_server": "Y",
        "routing_prefix": "13",
        "ext_context": "default",
        "answer_transfer_agent": "8365",
        "local_gmt": "-5.00",
        "outbound_calls_per_second": 5,
        "conf_engine": "MEETME",
        "active_twin_server_ip": "",
    }
    with pytest.raises(pymysql.err.IntegrityError):
        run(db, "INSERT INTO servers (server_id, server_ip) VALUES ('dflt2', '10.7.7.7')")


def test_other_vicidial_defaults(db: Connection) -> None:
    run(db, "INSERT INTO system_settings () VALUES ()")
    settings = rows(db, "SELECT * FROM system_settings")[-1]
    assert (
        settings["outbound_autodial_active"],
        settings["outbound_calls_per_second"],
        settings["disable_auto_dial"],
        settings["call_limit_24hour"],
        settings["pllb_grouping_limit"],
    ) == ("1", 10, "0", "0", 100)

    run(db, "INSERT INTO vicidial_campaigns (campaign_id, active) VALUES ('DFLT', 'Y')")
    campaign = rows(db, "SELECT * FROM vicidial_campaigns WHERE campaign_id = 'DFLT'")[0]
    assert (
        campaign["dial_timeout"],
        campaign["dial_prefix"],
        campaign["campaign_cid"],
        campaign["campaign_vdad_exten"],
        campaign["omit_phone_code"],
        campaign["queue_priority"],
        campaign["auto_alt_dial"],
        campaign["use_custom_cid"],
        campaign["pllb_grouping"],
        campaign["pllb_grouping_limit"],
    ) == (60, "9", "0000000000", "8368", "N", 50, "NONE", "N", "DISABLED", 50)

    run(
        db,
        "INSERT INTO vicidial_server_trunks (server_ip, campaign_id) VALUES ('10.7.7.7', 'DFLT')",
    )
    trunks = rows(db, "SELECT * FROM vicidial_server_trunks WHERE campaign_id = 'DFLT'")[0]
    assert (trunks["dedicated_trunks"], trunks["trunk_restriction"]) == (0, "OVERFLOW_ALLOWED")

    run(
        db,
        "INSERT INTO vicidial_campaign_server_stats (campaign_id, server_ip)"
        " VALUES ('DFLT', '10.7.7.7')",
    )
    stats = rows(db, "SELECT * FROM vicidial_campaign_server_stats WHERE campaign_id = 'DFLT'")[0]
    assert stats["local_trunk_shortage"] == 0 and stats["update_time"] is not None
    with pytest.raises(pymysql.err.IntegrityError):
        run(
            db,
            "INSERT INTO vicidial_campaign_server_stats (campaign_id, server_ip)"
            " VALUES ('DFLT', '10.7.7.7')",
        )

    run(db, "INSERT INTO vicidial_campaign_stats (campaign_id) VALUES ('DFLT')")
    assert rows(
        db, "SELECT balance_trunk_fill FROM vicidial_campaign_stats WHERE campaign_id = 'DFLT'"
    ) == [{"balance_trunk_fill": 0}]

    run(db, "INSERT INTO vicidial_hopper (lead_id, campaign_id) VALUES (1, 'DFLT')")
    hopper = rows(db, "SELECT * FROM vicidial_hopper WHERE campaign_id = 'DFLT'")[0]
    assert (hopper["status"], hopper["alt_dial"], hopper["hopper_id"] > 0) == (
        "READY",
        "NONE",
        True,
    )

    run(db, "INSERT INTO vicidial_list (phone_number) VALUES ('3125550002')")
    lead = rows(db, "SELECT * FROM vicidial_list WHERE phone_number = '3125550002'")[0]
    assert (lead["called_since_last_reset"], lead["called_count"]) == ("N", 0)

    run(db, "INSERT INTO vicidial_lists (list_id, campaign_id) VALUES (777, 'DFLT')")
    lst = rows(db, "SELECT * FROM vicidial_lists WHERE list_id = 777")[0]
    assert (lst["dial_prefix"], lst["campaign_cid_override"]) == ("", "")

    run(
        db,
        "INSERT INTO vicidial_live_agents (user, server_ip, extension, campaign_id)"
        " VALUES ('a1', '10.7.7.7', 'SIP/101', 'DFLT')",
    )
    agent = rows(db, "SELECT * FROM vicidial_live_agents WHERE user = 'a1'")[0]
    assert (agent["dial_campaign_id"], agent["live_agent_id"] > 0) == ("", True)

    run(db, "INSERT INTO vicidial_auto_calls (server_ip, campaign_id) VALUES ('10.7.7.7', 'DFLT')")
    call = rows(db, "SELECT * FROM vicidial_auto_calls WHERE campaign_id = 'DFLT'")[0]
    assert (call["call_type"], call["stage"], call["alt_dial"], call["queue_priority"]) == (
        "OUT",
        "START",
        "NONE",
        0,
    )

    run(db, "INSERT INTO phones (extension, server_ip, login) VALUES ('101', '10.7.7.7', 'p101')")
    with pytest.raises(pymysql.err.IntegrityError):
        run(db, "INSERT INTO phones (extension, server_ip, login) VALUES ('101', '10.7.7.7', 'x')")
    run(
        db,
        "INSERT INTO vicidial_server_carriers (carrier_id, server_ip) VALUES ('alpha', '10.7.7.7')",
    )
    carrier = rows(db, "SELECT * FROM vicidial_server_carriers WHERE carrier_id = 'alpha'")[0]
    assert (carrier["active"], carrier["protocol"]) == ("Y", "SIP")
    run(db, "INSERT INTO vicidial_conferences (conf_exten, server_ip) VALUES (8600051, '10.7.7.7')")
    assert rows(db, "SELECT extension FROM vicidial_conferences WHERE conf_exten = 8600051") == [
        {"extension": ""}
    ]
    run(db, "INSERT INTO vicidial_confbridges (conf_exten, server_ip) VALUES (9600000, '10.7.7.7')")
    assert rows(db, "SELECT extension FROM vicidial_confbridges WHERE conf_exten = 9600000") == [
        {"extension": ""}
    ]
    run(db, "INSERT INTO server_updater (server_ip, last_update) VALUES ('10.7.7.7', NOW())")
    with pytest.raises(pymysql.err.IntegrityError):
        run(db, "INSERT INTO server_updater (server_ip, last_update) VALUES ('10.7.7.7', NOW())")


def test_install_with_an_engine_converts_vicidials_tables_only(empty_db: Connection) -> None:
    report = schema.install(empty_db, engine="InnoDB")
    assert report.existing == []
    engines = {
        str(row["t"]): str(row["e"])
        for row in rows(
            empty_db,
            "SELECT table_name AS t, engine AS e FROM information_schema.tables"
            " WHERE table_schema = DATABASE()",
        )
    }
    assert {engines[t] for t in VICIDIAL_TABLES} == {"InnoDB"}
    assert engines["vb_leader"] == "MyISAM"
    with pytest.raises(DatabaseError, match="engine 'HEAP'"):
        schema.install(empty_db, engine="HEAP")


def test_an_old_schema_is_upgraded_in_order_and_check_names_it(empty_db: Connection) -> None:
    """A version-1 install (before vb_call_retries, the fence and decision epochs) upgrades."""
    schema.install(empty_db)
    with empty_db.cursor() as cur:
        cur.execute("DROP TABLE vb_call_retries, vb_leader")
        cur.execute("ALTER TABLE vb_decision_log DROP COLUMN epoch")
        cur.execute("DELETE FROM vb_schema_version WHERE version > 1")
    problems = [p.message for p in schema.check(empty_db)]
    assert any("schema version 1, this balancer needs 4" in m for m in problems), problems
    report = schema.install(empty_db)
    assert sorted(report.created) == ["vb_call_retries", "vb_leader"]
    assert report.migrated == [2, 3, 4] and report.notes == []
    assert schema.check(empty_db) == []
    columns = rows(
        empty_db,
        "SELECT column_name AS c FROM information_schema.columns WHERE table_schema = DATABASE()"
        " AND table_name = 'vb_decision_log' AND column_name = 'epoch'",
    )
    assert columns == [{"c": "epoch"}]
    # idempotent: nothing more to do
    again = schema.install(empty_db)
    assert again.created == [] and again.migrated == []
    # a half-applied step (the column already there) is run again without harm
    with empty_db.cursor() as cur:
        cur.execute("DELETE FROM vb_schema_version WHERE version >= 3")
    assert schema.install(empty_db).migrated == [3, 4]


DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("commit", ["4dabe00", "52e3f37"])
def test_a_schema_installed_by_an_earlier_release_upgrades(
    empty_db: Connection, monkeypatch: pytest.MonkeyPatch, commit: str
) -> None:
    """tests/data/schema-<commit>/ is sql/ as git history has it at that commit (4dabe00: before
    vb_call_retries; 52e3f37: the last release with the Redis lease and InnoDB tables)."""
    with monkeypatch.context() as old:
        old.setattr(schema, "SQL_DIR", DATA / f"schema-{commit}")
        old.setattr(schema, "SCHEMA_VERSION", 1)  # what that release recorded
        old.setattr(schema, "MIGRATIONS", ())
        schema.install(empty_db)
    assert rows(empty_db, "SELECT version FROM vb_schema_version") == [{"version": 1}]
    outdated = [p.message for p in schema.check(empty_db) if p.table.startswith("vb_")]
    assert any("schema version 1, this balancer needs" in m for m in outdated), outdated
    report = schema.install(empty_db)
    assert report.migrated == list(range(2, schema.SCHEMA_VERSION + 1))
    assert "vb_leader" in report.created
    assert ("vb_call_retries" in report.created) == (commit == "4dabe00")
    assert [p.message for p in schema.check(empty_db) if p.table.startswith("vb_")] == []
    assert "vb_campaign_grouping" not in _tables(empty_db) and report.notes == []
    # the upgraded tables take what the code writes now
    run(empty_db, "INSERT INTO vb_decision_log (kind, epoch) VALUES ('balance', 7)")
    assert rows(empty_db, "SELECT epoch FROM vb_decision_log") == [{"epoch": 7}]


def _tables(conn: Connection) -> set[str]:
    return {
        str(r["t"])
        for r in rows(
            conn,
            "SELECT table_name AS t FROM information_schema.tables WHERE table_schema = DATABASE()",
        )
    }


def _as_version_3(conn: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """sql/ as the last version-3 release had it (tests/data/schema-a8157c4, from git history:
    with vb_campaign_grouping), installed by that release's code."""
    with monkeypatch.context() as old:
        old.setattr(schema, "SQL_DIR", DATA / "schema-a8157c4")
        old.setattr(schema, "SCHEMA_VERSION", 3)
        old.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
        schema.install(conn)
    assert "vb_campaign_grouping" in _tables(conn)
    assert rows(conn, "SELECT MAX(version) AS v FROM vb_schema_version") == [{"v": 3}]


def test_upgrade_to_4_drops_vb_campaign_grouping_naming_each_row(
    empty_db: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Login grouping moved to VICIdial's own vicidial_campaigns.pllb_grouping: each row the old
    table held comes back as a note saying what to set there instead."""
    _as_version_3(empty_db, monkeypatch)
    run(
        empty_db,
        "INSERT INTO vb_campaign_grouping (campaign_id, mode, cascade_limit) VALUES"
        " ('CAMP1', 'CASCADING', 3), ('CAMP2', 'ONE_SERVER_ONLY', 0), ('GONE', 'NONE', 0),"
        " ('ZERO', 'CASCADING', 0)",
    )
    # VICIdial's own install has the columns (that release's test DDL did not declare them).
    run(
        empty_db,
        "ALTER TABLE vicidial_campaigns"
        " ADD pllb_grouping ENUM('DISABLED','ONE_SERVER_ONLY','CASCADING') DEFAULT 'DISABLED',"
        " ADD pllb_grouping_limit SMALLINT DEFAULT 50",
    )
    run(
        empty_db,
        "INSERT INTO vicidial_campaigns (campaign_id, active, pllb_grouping)"
        " VALUES ('CAMP1', 'Y', 'DISABLED'), ('CAMP2', 'Y', 'ONE_SERVER_ONLY')",
    )
    report = schema.install(empty_db)
    assert report.migrated == [4]
    assert report.notes == [
        "vb_campaign_grouping dropped its row for campaign CAMP1 (mode CASCADING, cascade_limit"
        " 3): set pllb_grouping = 'CASCADING', pllb_grouping_limit = 3 in that campaign's"
        " vicidial_campaigns row (VICIdial's campaign screen) (it is now 'DISABLED', limit 50)",
        "vb_campaign_grouping dropped its row for campaign CAMP2 (mode ONE_SERVER_ONLY,"
        " cascade_limit 0): set pllb_grouping = 'ONE_SERVER_ONLY' in that campaign's"
        " vicidial_campaigns row (VICIdial's campaign screen) (it is now 'ONE_SERVER_ONLY',"
        " limit 50)",
        "vb_campaign_grouping dropped its row for campaign GONE (mode NONE, cascade_limit 0):"
        " set pllb_grouping = 'DISABLED' in that campaign's vicidial_campaigns row (VICIdial's"
        " campaign screen)",
        "vb_campaign_grouping dropped its row for campaign ZERO (mode CASCADING, cascade_limit"
        " 0): set pllb_grouping = 'DISABLED' (cascade_limit 0 grouped nothing) in that"
        " campaign's vicidial_campaigns row (VICIdial's campaign screen)",
    ]
    assert "vb_campaign_grouping" not in _tables(empty_db)
    # VICIdial's tables as that release made them lack the new columns: only they are named.
    assert {(p.table, p.column) for p in schema.check(empty_db)} == {
        ("servers", "active_twin_server_ip"),
        ("servers", "conf_engine"),
        ("system_settings", "pllb_grouping_limit"),
    }
    assert "vicidial_confbridges" in report.created
    # VICIdial's own rows are untouched: setting them is the admin's call.
    assert rows(empty_db, "SELECT pllb_grouping FROM vicidial_campaigns ORDER BY campaign_id") == [
        {"pllb_grouping": "DISABLED"},
        {"pllb_grouping": "ONE_SERVER_ONLY"},
    ]
    # Idempotent: run again (the version lost), it finds nothing to say.
    run(empty_db, "DELETE FROM vb_schema_version WHERE version = 4")
    again = schema.install(empty_db)
    assert again.migrated == [4] and again.notes == []


def test_upgrade_to_4_with_an_empty_table_says_nothing(
    empty_db: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_version_3(empty_db, monkeypatch)
    report = schema.install(empty_db)
    assert report.migrated == [4] and report.notes == []
    assert "vb_campaign_grouping" not in _tables(empty_db)


def test_schema_install_prints_the_notes(
    empty_db: Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from balancer.cli.app import main

    _as_version_3(empty_db, monkeypatch)
    run(empty_db, "INSERT INTO vb_campaign_grouping VALUES ('CAMP1', 'CASCADING', 3)")
    name = str(rows(empty_db, "SELECT DATABASE() AS d")[0]["d"])
    url = _server_url().with_database(name)
    config = tmp_path / "vb.toml"
    config.write_text(f'[database]\nurl = "{url.unmasked()}"\n')
    result = CliRunner().invoke(main, ["--config", str(config), "schema", "install"])
    assert result.exit_code == 0, result.output
    assert "  upgraded the vb_ tables to schema version 4" in result.output
    assert (
        "  NOTE: vb_campaign_grouping dropped its row for campaign CAMP1 (mode CASCADING,"
        " cascade_limit 3): set pllb_grouping = 'CASCADING', pllb_grouping_limit = 3"
    ) in result.output
    assert ":vbtest@" not in result.output  # the password is never printed
