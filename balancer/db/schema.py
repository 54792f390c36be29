"""Installing and checking the schema; the CREATE TABLE statements in sql/ are the only source."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable

import pymysql

from balancer.db.connection import Connection
from balancer.errors import DatabaseError

log = logging.getLogger(__name__)

# The top-level sql/ directory, as package data (balancer/db/sql links to it, and the wheel
# carries the files), so an installed package finds its schema wherever it lives.
SQL_DIR: Traversable = resources.files("balancer.db") / "sql"
# Applied in this order: VICIdial's tables first, then the balancer's own.
SQL_FILES: tuple[str, ...] = ("vicidial.sql", "balancer.sql")
# The version of our own vb_ tables this code needs; see MIGRATIONS.
SCHEMA_VERSION = 4
# Engines a test or benchmark may ask VICIdial's tables to be created with (install(engine=)).
ENGINES = frozenset({"InnoDB", "MyISAM", "Aria"})
_ENGINE = re.compile(r"\bENGINE\s*=\s*\w+", re.IGNORECASE)

_CREATE = re.compile(r"CREATE\s+TABLE\s+IF\s+NOT\s+EXISTS\s+(`[^`]+`|\w+)\s*\(", re.IGNORECASE)
_NOT_COLUMNS = frozenset(
    {"PRIMARY", "UNIQUE", "KEY", "INDEX", "CONSTRAINT", "FOREIGN", "FULLTEXT", "SPATIAL", "CHECK"}
)
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.DOTALL)
_ER_TABLE_EXISTS = 1050


@dataclass(frozen=True)
class InstallReport:
    """Tables install created, tables it found already present and left alone, the
    migrations of our own vb_ tables it applied, and what those migrations ask of an admin."""

    created: list[str]
    existing: list[str]
    migrated: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SchemaProblem:
    """One way the database differs from sql/: a missing table (column None) or column."""

    table: str
    column: str | None
    message: str


@dataclass(frozen=True)
class _Table:
    name: str
    columns: tuple[str, ...]
    auto_increment: tuple[str, ...]
    statement: str
    source: str


def _scan(text: str, start: int, stop_chars: str, where: str) -> int:
    """Index of the first stop char at paren depth 0 outside quotes, or len(text)."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch in "'\"`":
            i = _skip_quoted(text, i, where)
            continue
        if ch in stop_chars and depth == 0:
            return i
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        i += 1
    return len(text)


def _skip_quoted(text: str, i: int, where: str) -> int:
    """Index just past the quoted string starting at i (backslash escapes; '' is two strings)."""
    quote = text[i]
    j = i + 1
    while j < len(text):
        if text[j] == "\\" and quote != "`":
            j += 2
            continue
        if text[j] == quote:
            return j + 1
        j += 1
    raise DatabaseError(f"{where}: unterminated {quote} quote")


def statements(path: Traversable) -> list[str]:
    """Split a .sql file into statements, dropping comments; `;` inside quotes does not split."""
    text = path.read_text(encoding="utf-8")
    where = str(path)
    result: list[str] = []
    buf: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"`":
            end = _skip_quoted(text, i, where)
            buf.append(text[i:end])
            i = end
        elif ch == "#" or (text.startswith("--", i) and (i + 2 == n or text[i + 2].isspace())):
            newline = text.find("\n", i)
            i = n if newline < 0 else newline
        elif text.startswith("/*", i):
            close = text.find("*/", i + 2)
            if close < 0:
                raise DatabaseError(f"{where}: unterminated /* comment")
            buf.append(" ")
            i = close + 2
        elif ch == ";":
            statement = "".join(buf).strip()
            if statement:
                result.append(statement)
            buf = []
            i += 1
        else:
            buf.append(ch)
            i += 1
    statement = "".join(buf).strip()
    if statement:
        result.append(statement)
    return result


def _unquote(name: str) -> str:
    return name[1:-1] if name.startswith("`") and name.endswith("`") else name


def _parse_table(statement: str, source: str) -> _Table:
    """Table name, column names and AUTO_INCREMENT columns of one CREATE TABLE statement."""
    match = _CREATE.match(statement)
    if match is None:
        head = " ".join(statement.split())[:60]
        raise DatabaseError(f"sql/{source}: not a CREATE TABLE IF NOT EXISTS statement: {head}")
    name = _unquote(match.group(1))
    where = f"sql/{source}: table {name}"
    open_paren = match.end() - 1
    close = _scan(statement, open_paren + 1, ")", where)
    if close >= len(statement):
        raise DatabaseError(f"{where}: unbalanced parentheses")
    body = statement[open_paren + 1 : close]
    columns: list[str] = []
    auto_increment: list[str] = []
    start = 0
    while start < len(body):
        end = _scan(body, start, ",", where)
        item = body[start:end].strip()
        start = end + 1
        if not item:
            raise DatabaseError(f"{where}: empty column definition")
        first = re.match(r"`[^`]+`|\w+", item)
        if first is None:
            raise DatabaseError(f"{where}: cannot read column definition {item[:40]!r}")
        if first.group(0).upper() in _NOT_COLUMNS:
            continue
        column = _unquote(first.group(0))
        columns.append(column)
        if re.search(r"\bAUTO_INCREMENT\b", _QUOTED.sub("''", item), re.IGNORECASE):
            auto_increment.append(column)
    if not columns:
        raise DatabaseError(f"{where}: no columns")
    return _Table(name, tuple(columns), tuple(auto_increment), statement, source)


def _tables() -> list[_Table]:
    """Every table of SQL_FILES, in install order."""
    tables: list[_Table] = []
    seen: set[str] = set()
    for source in SQL_FILES:
        for statement in statements(SQL_DIR / source):
            table = _parse_table(statement, source)
            if table.name in seen:
                raise DatabaseError(f"sql/{source}: table {table.name} is defined twice")
            seen.add(table.name)
            tables.append(table)
    return tables


def expected_tables() -> dict[str, list[str]]:
    """Table name → column names, as declared by the CREATE TABLE statements in sql/."""
    return {table.name: list(table.columns) for table in _tables()}


def _mysql_error(exc: pymysql.MySQLError) -> str:
    if len(exc.args) >= 2:
        return f"{exc.args[0]}: {exc.args[1]}"
    return str(exc)


def _current_database(conn: Connection) -> str:
    """The connection's selected database; DatabaseError when none is selected."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT DATABASE()")
            row = cur.fetchone()
    except pymysql.MySQLError as exc:
        raise DatabaseError(f"reading the current database failed ({_mysql_error(exc)})") from None
    if row is None or row[0] is None:
        raise DatabaseError("no database selected: the database URL must name one")
    return str(row[0])


def _columns_present(conn: Connection, database: str) -> dict[str, dict[str, str]]:
    """Table → lower-case column name → information_schema EXTRA, for one database."""
    present: dict[str, dict[str, str]] = {}
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT table_name, column_name, extra FROM information_schema.columns"
                " WHERE table_schema = %s",
                (database,),
            )
            for table, column, extra in cur.fetchall():
                present.setdefault(str(table), {})[str(column).lower()] = str(extra or "")
    except pymysql.MySQLError as exc:
        raise DatabaseError(
            f"database {database}: reading information_schema failed ({_mysql_error(exc)})"
        ) from None
    return present


def install(conn: Connection, engine: str | None = None) -> InstallReport:
    """Create every table of sql/ that is missing, then bring our own vb_ tables up to
    SCHEMA_VERSION. VICIdial's tables already present are never touched.

    ``engine`` (tests and benchmarks only) creates VICIdial's tables with that engine instead of
    VICIdial's own MyISAM/MEMORY, as on a site that converted them.
    """
    if engine is not None and engine not in ENGINES:
        raise DatabaseError(f"engine {engine!r}: not one of {', '.join(sorted(ENGINES))}")
    tables = _tables()
    database = _current_database(conn)
    present = _columns_present(conn, database)
    created: list[str] = []
    existing: list[str] = []
    for table in tables:
        if table.name in present:
            existing.append(table.name)
            continue
        statement = table.statement
        if engine is not None and table.source == "vicidial.sql":
            statement = _ENGINE.sub(f"ENGINE={engine}", statement)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
                cur.execute("SHOW WARNINGS")
                warnings = cur.fetchall()
        except pymysql.MySQLError as exc:
            raise DatabaseError(
                f"database {database}: CREATE TABLE {table.name} (sql/{table.source}) failed"
                f" ({_mysql_error(exc)})"
            ) from None
        # Another process may have created it between our look and our CREATE ... IF NOT EXISTS.
        if any(warning[1] == _ER_TABLE_EXISTS for warning in warnings):
            existing.append(table.name)
        else:
            created.append(table.name)
    if "vb_schema_version" in created:
        # Every vb_ table was just created at the current definitions: all versions apply.
        _record_versions(conn, database, range(1, SCHEMA_VERSION + 1))
        migrated: list[int] = []
        notes: list[str] = []
    else:
        migrated, notes = upgrade(conn)
    return InstallReport(created=created, existing=existing, migrated=migrated, notes=notes)


# --------------------------------------------------------------------------- migrations


def _column_exists(conn: Connection, table: str, column: str) -> bool:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = DATABASE()"
            " AND table_name = %s AND column_name = %s",
            (table, column),
        )
        return cur.fetchone() is not None


def _add_column(conn: Connection, table: str, column: str, definition: str) -> None:
    """ALTER TABLE ... ADD COLUMN (and its index) unless the column is there already."""
    if _column_exists(conn, table, column):
        return
    with conn.cursor() as cur:
        cur.execute(
            f"ALTER TABLE `{table}` ADD COLUMN `{column}` {definition}, ADD KEY (`{column}`)"
        )


def _v2(conn: Connection) -> None:
    """vb_call_retries (per-call failover): created by install's table pass."""


def _v3(conn: Connection) -> None:
    """The database leader fence: vb_leader (table pass), decision epochs, retry states."""
    _add_column(
        conn,
        "vb_decision_log",
        "epoch",
        "BIGINT UNSIGNED NULL COMMENT 'leader epoch that wrote a balance/failover row'",
    )
    _add_column(
        conn,
        "vb_call_retries",
        "state",
        "ENUM('placing','placed','undone') NOT NULL DEFAULT 'placed'",
    )


def _grouping_note(campaign_id: str, mode: str, limit: int, now: tuple[str, str] | None) -> str:
    """What an admin sets in VICIdial for one dropped vb_campaign_grouping row."""
    if mode == "CASCADING" and limit > 0:
        wanted = f"pllb_grouping = 'CASCADING', pllb_grouping_limit = {limit}"
    elif mode == "ONE_SERVER_ONLY":
        wanted = "pllb_grouping = 'ONE_SERVER_ONLY'"
    elif mode == "CASCADING":
        # Our CASCADING without a limit chose as if ungrouped.
        wanted = "pllb_grouping = 'DISABLED' (cascade_limit 0 grouped nothing)"
    else:
        wanted = "pllb_grouping = 'DISABLED'"
    current = "" if now is None else f" (it is now {now[0]!r}, limit {now[1]})"
    return (
        f"vb_campaign_grouping dropped its row for campaign {campaign_id} (mode {mode}, "
        f"cascade_limit {limit}): set {wanted} in that campaign's vicidial_campaigns row "
        f"(VICIdial's campaign screen){current}"
    )


def _v4(conn: Connection) -> list[str]:
    """vb_campaign_grouping goes: login grouping is VICIdial's own vicidial_campaigns.pllb_*.

    Each row it still holds comes back as a note naming the VICIdial setting to use instead.
    """
    with conn.cursor() as cur:
        cur.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = DATABASE()"
            " AND table_name = 'vb_campaign_grouping'"
        )
        if cur.fetchone() is None:
            return []
        cur.execute(
            "SELECT campaign_id, mode, cascade_limit FROM vb_campaign_grouping ORDER BY campaign_id"
        )
        rows = [(str(c), str(m), int(n)) for c, m, n in cur.fetchall()]
    current: dict[str, tuple[str, str]] = {}
    if rows and _column_exists(conn, "vicidial_campaigns", "pllb_grouping"):
        with conn.cursor() as cur:
            cur.execute(
                "SELECT campaign_id, pllb_grouping, pllb_grouping_limit FROM vicidial_campaigns"
                " WHERE campaign_id IN %s",
                ([c for c, _, _ in rows],),
            )
            current = {str(c): (str(g), str(n)) for c, g, n in cur.fetchall()}
    notes = [_grouping_note(c, m, n, current.get(c)) for c, m, n in rows]
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS vb_campaign_grouping")
    return notes


# Ordered steps for our own vb_ tables only (never VICIdial's); each is idempotent, so a step
# that fails halfway is simply run again. Missing tables are created by install beforehand.
# A step may return notes for the admin (printed by `schema install`, logged).
MIGRATIONS: tuple[tuple[int, str, Callable[[Connection], list[str] | None]], ...] = (
    (2, "vb_call_retries for per-call failover", _v2),
    (3, "vb_leader fence, vb_decision_log.epoch, vb_call_retries.state", _v3),
    (4, "vb_campaign_grouping dropped for VICIdial's vicidial_campaigns.pllb_grouping", _v4),
)


def _record_versions(conn: Connection, database: str, versions: range | list[int]) -> None:
    try:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT IGNORE INTO vb_schema_version (version) VALUES (%s)",
                [(v,) for v in versions],
            )
        if not conn.get_autocommit():
            conn.commit()
    except pymysql.MySQLError as exc:
        raise DatabaseError(
            f"database {database}: recording schema version in vb_schema_version failed"
            f" ({_mysql_error(exc)})"
        ) from None


def schema_version(conn: Connection) -> int | None:
    """The highest version recorded in vb_schema_version; None when that table is missing."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT MAX(version) FROM vb_schema_version")
            row = cur.fetchone()
    except pymysql.MySQLError:
        return None
    return int(row[0]) if row is not None and row[0] is not None else 0


def require_current(conn: Connection) -> None:
    """DatabaseError naming the fix when our vb_ tables are older than this code needs."""
    version = schema_version(conn)
    if version is None:
        raise DatabaseError(
            "the balancer's tables are missing (no vb_schema_version):"
            " run `vici-balancer schema install`"
        )
    if version < SCHEMA_VERSION:
        raise DatabaseError(
            f"the vb_ tables are at schema version {version}, this balancer needs"
            f" {SCHEMA_VERSION}: run `vici-balancer schema install` to upgrade them"
        )


def upgrade(conn: Connection) -> tuple[list[int], list[str]]:
    """Apply the migrations newer than the recorded version; the versions applied and the
    steps' notes for the admin (each also logged)."""
    database = _current_database(conn)
    current = schema_version(conn) or 0
    applied: list[int] = []
    notes: list[str] = []
    for version, what, step in MIGRATIONS:
        if version <= current:
            continue
        try:
            said = step(conn) or []
        except pymysql.MySQLError as exc:
            raise DatabaseError(
                f"database {database}: schema migration {version} ({what}) failed"
                f" ({_mysql_error(exc)})"
            ) from None
        # Logged before the version is recorded: a note is never lost to a later failure.
        for note in said:
            log.warning("schema migration %d: %s", version, note)
        notes.extend(said)
        _record_versions(conn, database, [version])
        applied.append(version)
    return applied, notes


def check(conn: Connection) -> list[SchemaProblem]:
    """Missing tables and columns, and AUTO_INCREMENT keys that are not; empty when all is well."""
    database = _current_database(conn)
    present = _columns_present(conn, database)
    problems: list[SchemaProblem] = []
    if "vb_schema_version" in present:
        version = schema_version(conn) or 0
        if version < SCHEMA_VERSION:
            problems.append(
                SchemaProblem(
                    "vb_schema_version",
                    None,
                    f"the vb_ tables are at schema version {version}, this balancer needs"
                    f" {SCHEMA_VERSION}: run `vici-balancer schema install` to upgrade them",
                )
            )
    for table in _tables():
        columns = present.get(table.name)
        if columns is None:
            problems.append(
                SchemaProblem(table.name, None, f"table {table.name} is missing in {database}")
            )
            continue
        for column in table.columns:
            if column.lower() not in columns:
                problems.append(
                    SchemaProblem(table.name, column, f"column {table.name}.{column} is missing")
                )
        for column in table.auto_increment:
            extra = columns.get(column.lower())
            if extra is not None and "auto_increment" not in extra.lower():
                problems.append(
                    SchemaProblem(
                        table.name,
                        column,
                        f"column {table.name}.{column} is not AUTO_INCREMENT:"
                        " inserts that leave it out fail under strict SQL mode",
                    )
                )
    return problems
