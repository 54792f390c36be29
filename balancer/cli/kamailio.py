"""`vici-balancer kamailio`: what each Kamailio's dispatcher has beside what the balancer wants."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from balancer.cli.common import EXIT_FAILURE, EXIT_USAGE, AppContext, fail, handle_errors


@click.command("kamailio")
@click.option("--json", "as_json", is_flag=True, help="Print the document as JSON.")
@click.pass_obj
@handle_errors
def kamailio_command(app: AppContext, as_json: bool) -> None:
    """Per dispatcher set and destination: Kamailio's state and weight (dispatcher.list) beside
    the balancer's wish and when it last published. Exit 1 when an endpoint is unreachable, no
    daemon is publishing, or a destination is not as wanted."""
    from balancer.kamailio.view import kamailio_view, render_view
    from balancer.store.factory import open_store

    config = app.config()
    if config.kamailio is None:
        fail("kamailio: no [kamailio] section in the configuration", EXIT_USAGE)
    kamailio = config.kamailio

    async def read() -> dict[str, object]:
        if config.redis.is_memory:
            return await kamailio_view(kamailio, None)
        store = open_store(config.redis)
        try:
            return await kamailio_view(kamailio, store)
        finally:
            await store.close()

    doc = asyncio.run(read())
    if config.redis.is_memory:
        problems = doc["problems"]
        assert isinstance(problems, list)
        problems.append(
            "redis.url is 'memory://': the daemon's wishes live in its own process; "
            "set redis.url to the Redis the daemon uses to see them"
        )
        doc["ok"] = False
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(render_view(doc))
    if not doc["ok"]:
        sys.exit(EXIT_FAILURE)
