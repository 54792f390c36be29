"""`vici-balancer status`: every server's health and live lines, from the shared state store."""

from __future__ import annotations

import asyncio
import sys

import click

from balancer.cli.common import EXIT_FAILURE, AppContext, fail, handle_errors


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
@click.option("--watch", is_flag=True, help="Redraw the table in place until interrupted.")
@click.option(
    "--interval",
    type=click.FloatRange(0.2, 3600),
    default=2.0,
    show_default=True,
    help="Seconds between redraws with --watch.",
)
@click.option("--count", type=click.IntRange(1), default=None, hidden=True)
@click.pass_obj
@handle_errors
def status(app: AppContext, as_json: bool, watch: bool, interval: float, count: int | None) -> None:
    """Show every server's health and live lines (exit 1 when the state is stale or missing)."""
    import json

    from balancer.live.status import build_status, render_table
    from balancer.store.factory import open_store

    config = app.config()
    if config.redis.is_memory:
        fail(
            "status reads the shared state store, but redis.url is 'memory://' (state lives inside "
            "the daemon process); set redis.url to the Redis the daemon uses"
        )

    source = config.redis.url.split("@")[-1]

    async def read() -> dict[str, object]:
        store = open_store(config.redis)
        try:
            return await build_status(store, source)
        finally:
            await store.close()

    if watch:
        import time

        frames = 0
        try:
            while count is None or frames < count:
                frame = render_table(asyncio.run(read()))
                stamp = time.strftime("%H:%M:%S")
                # color=True: click would strip the cursor-home/clear codes as "styling".
                click.echo(
                    f"\x1b[H\x1b[2J{stamp}  {source}  (every {interval:g}s, Ctrl-C to quit)",
                    color=True,
                )
                click.echo(frame)
                frames += 1
                if count is None or frames < count:
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass
        return
    doc = asyncio.run(read())
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(render_table(doc))
    if doc["stale"]:
        sys.exit(EXIT_FAILURE)
