"""`vici-balancer sim` and `demo`: simulated Asterisk servers, and the balancer against them."""

from __future__ import annotations

import asyncio
import os
import sys

import click

from balancer.cli.common import (
    EXIT_FAILURE,
    AppContext,
    database_url_option,
    fail,
    handle_errors,
    resolve_database_url,
)


@click.command()
@click.option("--servers", "count", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--base-port", type=click.IntRange(1, 65000), default=15038, show_default=True)
@click.option(
    "--host",
    type=click.Choice(["127.0.0.1", "::1"]),
    default="127.0.0.1",
    show_default=True,
    help="Loopback address to listen on.",
)
@handle_errors
def sim(count: int, base_port: int, host: str) -> None:
    """Run simulated Asterisk servers (AMI on loopback) until interrupted."""
    from balancer.sim.cluster import serve_cluster

    try:
        asyncio.run(serve_cluster(count, base_port, host, print_fn=click.echo))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        fail(f"sim: cannot listen on {host}:{base_port}..: {exc.strerror}")


@click.command()
@database_url_option
@click.option(
    "--duration",
    type=click.FloatRange(1, 3600),
    default=20.0,
    show_default=True,
    help="Seconds to run.",
)
@click.option("--servers", "count", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option(
    "--refresh",
    type=click.FloatRange(0.1, 60),
    default=2.0,
    show_default=True,
    help="Seconds between status tables.",
)
@click.option(
    "--http",
    "http_listen",
    metavar="HOST:PORT",
    default=None,
    help="Also serve the dashboard and /metrics here (a loopback address, e.g. 127.0.0.1:9108).",
)
@click.pass_obj
@handle_errors
def demo(
    app: AppContext,
    database_url: str | None,
    duration: float,
    count: int,
    refresh: float,
    http_listen: str | None,
) -> None:
    """Track simulated Asterisk servers with live traffic and show the status table."""
    from balancer.config import LogConfig
    from balancer.config_values import parse_host_port
    from balancer.demo import run_demo
    from balancer.ops.logs import setup_logging
    from balancer.web.settings import HttpConfig

    url, _ = resolve_database_url(app, database_url or os.environ.get("VB_DEMO_DATABASE_URL"))
    http = None
    if http_listen is not None:
        http = HttpConfig(listen=parse_host_port("--http", http_listen), listen_key="--http")
        if not http.loopback:
            fail("--http: the demo serves on a loopback address only (127.0.0.1:9108)", 2)
    setup_logging(LogConfig(level="WARNING"))
    ok = asyncio.run(run_demo(url, duration, count, refresh, echo=click.echo, http=http))
    if not ok:
        sys.exit(EXIT_FAILURE)
