"""The `vici-balancer` command group: every command, each defined in its own module here.

Exit codes: 0 ok, 1 failure at run time, 2 bad usage or bad configuration.
"""

from __future__ import annotations

from pathlib import Path

import click

from balancer import __version__
from balancer.cli.agents import assign_phone_command, drain_command, undrain_command
from balancer.cli.check import check_command
from balancer.cli.common import AppContext
from balancer.cli.files import files
from balancer.cli.kamailio import kamailio_command
from balancer.cli.routes import routes_command
from balancer.cli.run import rebalance, run
from balancer.cli.schema import schema
from balancer.cli.sim import demo, sim
from balancer.cli.status import status


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vici-balancer")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="VICI_BALANCER_CONFIG",
    help="TOML configuration file (default /etc/vici-balancer.toml).",
)
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, debug: bool) -> None:
    """Cluster balancer for VICIdial: live AMI line counts, server choice, carrier failover."""
    ctx.obj = AppContext(config_path, debug)


for _command in (
    schema,
    sim,
    run,
    status,
    rebalance,
    demo,
    assign_phone_command,
    drain_command,
    undrain_command,
    check_command,
    routes_command,
    kamailio_command,
    files,
):
    main.add_command(_command)

if __name__ == "__main__":
    main()
