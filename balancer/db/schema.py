"""Installing and checking the schema; the CREATE TABLE statements in sql/ are the only source."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pymysql

from balancer.db.connection import Connection
from balancer.errors import DatabaseError

SQL_DIR: Path = Path(__file__).resolve().parents[2] / "sql"
# Applied in this order: VICIdial's tables first, then the balancer's own.
SQL_FILES: tuple[str, ...] = ("vicidial.sql", "balancer.sql")
# Recorded in vb_schema_version when install creates that table.
SCHEMA_VERSION = 1

_CREATE = re.compile(r"CREATE\s+TABLE\s+IF\s+NOT\s+EXISTS\s+(`[^`]+`|\w+)\s*\(", re.IGNORECASE)
_NOT_COLUMNS = frozenset(
    {"PRIMARY", "UNIQUE", "KEY", "INDEX", "CONSTRAINT", "FOREIGN", "FULLTEXT", "SPATIAL", "CHECK"}
)
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.DOTALL)
_ER_TABLE_EXISTS = 1050


@dataclass(frozen=True)
class InstallReport:
    """Tables install created, and tables it found already present and left alone."""

    created: list[str]
    existing: list[str]


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


def statements(path: Path) -> list[str]:
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


def install(conn: Connection) -> InstallReport:
    """Create every table of sql/ that is missing; tables already present are never touched."""
    tables = _tables()
    database = _current_database(conn)
    present = _columns_present(conn, database)
    created: list[str] = []
    existing: list[str] = []
    for table in tables:
        if table.name in present:
            existing.append(table.name)
            continue
        try:
            with conn.cursor() as cur:
                cur.execute(table.statement)
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
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "INSERT IGNORE INTO vb_schema_version (version) VALUES (%s)", (SCHEMA_VERSION,)
                )
            if not conn.get_autocommit():
                conn.commit()
        except pymysql.MySQLError as exc:
            raise DatabaseError(
                f"database {database}: recording schema version in vb_schema_version failed"
                f" ({_mysql_error(exc)})"
            ) from None
    return InstallReport(created=created, existing=existing)


def check(conn: Connection) -> list[SchemaProblem]:
    """Missing tables and columns, and AUTO_INCREMENT keys that are not; empty when all is well."""
    database = _current_database(conn)
    present = _columns_present(conn, database)
    problems: list[SchemaProblem] = []
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
