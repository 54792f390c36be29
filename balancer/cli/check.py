"""`vici-balancer check`: config, MySQL schema, Redis and every AMI login, one line each.

Added to the main group by `register(main)`; cli.py's helpers are imported at registration,
not at import, so cli.py can import this module at its end without a circular import.
"""

from __future__ import annotations

import asyncio

import click

from balancer.checks import run_checks


def _command() -> click.Command:
    from balancer.cli import AppContext, fail, handle_errors

    @click.command("check")
    @click.pass_obj
    @handle_errors
    def check(app: AppContext) -> None:
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

    return check


def register(group: click.Group) -> None:
    """Add `check` to ``group`` (the main CLI group); idempotent."""
    if "check" not in group.commands:
        group.add_command(_command())
