"""The `vici-balancer` command line: thin click commands over the library.

Exit codes: 0 ok, 1 failure at run time, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from balancer import __version__
from balancer.config import Config, load_config
from balancer.db.url import DatabaseUrl, parse_database_url
from balancer.errors import BalancerError, ConfigError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILURE = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one line to stderr and exit with ``code``."""
    click.echo(f"vici-balancer: {message}", err=True)
    sys.exit(code)


class AppContext:
    """What the group passes to its commands: the config path, loaded on demand."""

    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None

    def config(self) -> Config:
        """Load and validate the configuration once; exit 2 naming the key when invalid."""
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as exc:
                fail(f"bad config: {exc}", EXIT_USAGE)
        return self._config


def handle_errors(func: F) -> F:
    """Turn our own errors into one clear line and the right exit code."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(f"bad config: {exc}", EXIT_USAGE)
        except BalancerError as exc:
            fail(str(exc))

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]


def database_url_option(func: F) -> F:
    """--database-url, overriding the configuration's database."""
    return click.option(
        "--database-url",
        metavar="URL",
        help="mysql://user:password@host:port/database (default: from the configuration).",
    )(func)


def resolve_database_url(app: AppContext, override: str | None) -> tuple[DatabaseUrl, float]:
    """The --database-url when given, else the configuration's; with the connect timeout."""
    if override:
        try:
            return parse_database_url(override, "--database-url"), 5.0
        except ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
    config = app.config()
    return config.database.url, config.database.connect_timeout_s


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vici-balancer")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="VICI_BALANCER_CONFIG",
    help="TOML configuration file (default /etc/vici-balancer.toml).",
)
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """Cluster balancer for VICIdial: live AMI line counts, server choice, carrier failover."""
    ctx.obj = AppContext(config_path)


# --------------------------------------------------------------------------- schema


@main.group()
def schema() -> None:
    """Install or check the VICIdial and balancer tables."""


@schema.command("install")
@database_url_option
@click.pass_obj
@handle_errors
def schema_install(app: AppContext, database_url: str | None) -> None:
    """Create missing tables from sql/ (never drops or alters existing ones)."""
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


# --------------------------------------------------------------------------- sim


@main.command()
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


# --------------------------------------------------------------------------- run / status


@main.command()
@click.pass_obj
@handle_errors
def run(app: AppContext) -> None:
    """Run the daemon: track every server's live lines over AMI into the state store."""
    from balancer.daemon import run as run_daemon
    from balancer.logs import setup_logging

    config = app.config()
    setup_logging(config.log)
    run_daemon(config)


@main.command()
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

    from balancer.status import build_status, render_table
    from balancer.store import open_store

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


# --------------------------------------------------------------------------- rebalance


@main.command()
@click.option("--once", is_flag=True, required=True, help="Run exactly one cycle (for cron).")
@click.option("--dry-run", is_flag=True, help="Plan and print; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the cycle as JSON.")
@click.pass_obj
@handle_errors
def rebalance(app: AppContext, once: bool, dry_run: bool, as_json: bool) -> None:
    """Run one balance cycle of the daemon's own code and print its plan."""
    import json

    from balancer.daemon import rebalance_once
    from balancer.logs import setup_logging
    from balancer.report import cycle_document, render_cycle

    config = app.config()
    setup_logging(config.log)
    result = asyncio.run(rebalance_once(config, dry_run=dry_run))
    if as_json:
        click.echo(json.dumps(cycle_document(result), indent=2, sort_keys=True))
    else:
        click.echo(render_cycle(result))
    if result.report is not None and result.report.errors:
        sys.exit(EXIT_FAILURE)


# --------------------------------------------------------------------------- demo


@main.command()
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
@click.pass_obj
@handle_errors
def demo(
    app: AppContext, database_url: str | None, duration: float, count: int, refresh: float
) -> None:
    """Track simulated Asterisk servers with live traffic and show the status table."""
    from balancer.config import LogConfig
    from balancer.demo import run_demo
    from balancer.logs import setup_logging

    url, _ = resolve_database_url(app, database_url or os.environ.get("VB_DEMO_DATABASE_URL"))
    setup_logging(LogConfig(level="WARNING"))
    ok = asyncio.run(run_demo(url, duration, count, refresh, echo=click.echo))
    if not ok:
        sys.exit(EXIT_FAILURE)


# assign-phone, drain, undrain live in their own module (one concern each).
from balancer.cli_agents import register as _register_agent_commands  # noqa: E402

_register_agent_commands(main)

from balancer.cli_check import register as _register_check_command  # noqa: E402

_register_check_command(main)

from balancer.cli_routes import register as _register_routes_command  # noqa: E402

_register_routes_command(main)

if __name__ == "__main__":
    main()
