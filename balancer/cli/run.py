"""`vici-balancer run` (the daemon) and `rebalance --once` (one cycle of its code, for cron)."""

from __future__ import annotations

import asyncio
import sys

import click

from balancer.cli.common import EXIT_FAILURE, AppContext, handle_errors


@click.command()
@click.pass_obj
@handle_errors
def run(app: AppContext) -> None:
    """Run the daemon: track every server's live lines over AMI into the state store."""
    from balancer.lifecycle import run as run_daemon
    from balancer.ops.logs import setup_logging

    config = app.config()
    setup_logging(config.log)
    run_daemon(config)


@click.command()
@click.option("--once", is_flag=True, required=True, help="Run exactly one cycle (for cron).")
@click.option("--dry-run", is_flag=True, help="Plan and print; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the cycle as JSON.")
@click.pass_obj
@handle_errors
def rebalance(app: AppContext, once: bool, dry_run: bool, as_json: bool) -> None:
    """Run one balance cycle of the daemon's own code and print its plan."""
    import json

    from balancer.balance.report import cycle_document, render_cycle
    from balancer.daemon import rebalance_once
    from balancer.ops.logs import setup_logging

    config = app.config()
    setup_logging(config.log)
    result = asyncio.run(rebalance_once(config, dry_run=dry_run))
    if as_json:
        click.echo(json.dumps(cycle_document(result), indent=2, sort_keys=True))
    else:
        click.echo(render_cycle(result))
    if result.report is not None and result.report.errors:
        sys.exit(EXIT_FAILURE)
