"""`vici-balancer check`: config, MySQL schema, Redis and every AMI login, one line each."""

from __future__ import annotations

import asyncio

import click

from balancer.cli.common import AppContext, fail, handle_errors
from balancer.ops.checks import run_checks


@click.command("check")
@click.pass_obj
@handle_errors
def check_command(app: AppContext) -> None:
    """Check the configuration, the database schema, Redis and the AMI login of every
    active server; one line per check. Exit 0 only when all pass (1 otherwise, 2 on a bad
    configuration). Secrets are never printed."""
    config = app.config()
    results = asyncio.run(run_checks(config))
    for result in results:
        click.echo(result.line())
    failed = [result for result in results if not result.ok]
    if failed:
        names = ", ".join(dict.fromkeys(result.name for result in failed))
        fail(f"{len(failed)} of {len(results)} checks failed ({names})")
