"""`vici-balancer routes`: the route table and every carrier's state, as the leader sees it."""

from __future__ import annotations

import asyncio
import json

import click

from balancer.carriers.view import read_routes, render_routes
from balancer.cli.common import EXIT_FAILURE, AppContext, handle_errors


@click.command("routes")
@click.option("--json", "as_json", is_flag=True, help="Print the routes document as JSON.")
@click.pass_obj
@handle_errors
def routes_command(app: AppContext, as_json: bool) -> None:
    """Show the route table and each carrier's state (closed/open/half-open), failure ratio
    and lines in use per server, as the leading daemon sees them (exit 1 without them)."""
    config = app.config()
    doc = asyncio.run(read_routes(config))
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(render_routes(doc))
    if doc["problems"]:
        raise SystemExit(EXIT_FAILURE)
