"""`vici-balancer schema install|check`: the VICIdial and balancer tables."""

from __future__ import annotations

import click

from balancer.cli.common import (
    AppContext,
    database_url_option,
    fail,
    handle_errors,
    resolve_database_url,
)


@click.group()
def schema() -> None:
    """Install or check the VICIdial and balancer tables."""


@schema.command("install")
@database_url_option
@click.pass_obj
@handle_errors
def schema_install(app: AppContext, database_url: str | None) -> None:
    """Create missing tables from sql/ and upgrade our own vb_ tables (VICIdial's untouched)."""
    url, timeout = resolve_database_url(app, database_url)
    from balancer.db import schema as db_schema
    from balancer.db.connection import connect

    conn = connect(url, timeout)
    try:
        report = db_schema.install(conn)
    finally:
        conn.close()
    click.echo(
        f"schema install on {url}: {len(report.created)} created, "
        f"{len(report.existing)} already present"
    )
    for table in report.created:
        click.echo(f"  created {table}")
    for version in report.migrated:
        click.echo(f"  upgraded the vb_ tables to schema version {version}")
    for note in report.notes:
        click.echo(f"  NOTE: {note}")


@schema.command("check")
@database_url_option
@click.pass_obj
@handle_errors
def schema_check(app: AppContext, database_url: str | None) -> None:
    """Report tables and columns the balancer needs that the database lacks (exit 1 if any)."""
    url, timeout = resolve_database_url(app, database_url)
    from balancer.db import schema as db_schema
    from balancer.db.connection import connect

    conn = connect(url, timeout)
    try:
        problems = db_schema.check(conn)
    finally:
        conn.close()
    if not problems:
        click.echo(f"schema check on {url}: ok")
        return
    for problem in problems:
        click.echo(f"  {problem.message}")
    fail(f"schema check on {url}: {len(problems)} problem(s)")
