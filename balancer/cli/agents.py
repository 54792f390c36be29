"""`vici-balancer assign-phone`, `drain`, `undrain`: agent phones and the drain flag."""

from __future__ import annotations

import json

import click

from balancer.agents.assign import assign_phone, render_assignment, set_drain
from balancer.agents.choice import VICIDIAL_MODE
from balancer.cli.common import (
    EXIT_FAILURE,
    AppContext,
    database_url_option,
    fail,
    handle_errors,
    resolve_database_url,
)

SHARED_STORE_NEEDED = (
    "{what} needs the state store shared with the daemons, but redis.url is 'memory://' "
    "(that state lives inside one daemon process); set redis.url to the Redis the daemons use"
)


@click.command("assign-phone")
@click.argument("alias_or_logins")
@click.option("--campaign", "campaign_id", metavar="C", help="Campaign the agent logs into.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@database_url_option
@click.pass_obj
@handle_errors
def assign_phone_command(
    app: AppContext,
    alias_or_logins: str,
    campaign_id: str | None,
    as_json: bool,
    database_url: str | None,
) -> None:
    """Choose the phone login (and so the server) for a phones_alias id or 'login1,login2'.

    With agents.mode = "capacity" (the default): by real capacity and live health, the
    eligible server with the lowest of max(agent utilisation, trunk utilisation). With
    "vicidial": exactly the login VICIdial's agent screen would pick (fewest agents). Both
    honour the campaign's pllb_grouping. The decision is recorded in vb_decision_log.
    Exit 1 when no login is usable.
    """
    config = app.config()
    # Only the capacity rule reads the live state shared by the daemons.
    if config.redis.is_memory and config.agents.mode != VICIDIAL_MODE:
        fail(SHARED_STORE_NEEDED.format(what="assign-phone"))
    url, timeout = resolve_database_url(app, database_url)
    doc = assign_phone(config, url, timeout, alias_or_logins, campaign_id)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    if doc["chosen"] is None:
        if as_json:
            raise SystemExit(EXIT_FAILURE)
        fail(render_assignment(doc))
    if not as_json:
        click.echo(render_assignment(doc))


def _drain_command(drained: bool) -> click.Command:
    verb = "drain" if drained else "undrain"

    @click.command(verb)
    @click.argument("server")
    @click.option("--reason", default="", help="Recorded in vb_decision_log.")
    @database_url_option
    @click.pass_obj
    @handle_errors
    def command(app: AppContext, server: str, reason: str, database_url: str | None) -> None:
        config = app.config()
        if config.redis.is_memory:
            fail(SHARED_STORE_NEEDED.format(what=verb))
        url, timeout = resolve_database_url(app, database_url)
        click.echo(set_drain(config, url, timeout, server, drained, reason))

    command.help = (
        "Drain SERVER (server_ip or server_id): no new balance calls or agent logins; "
        "calls in progress are untouched. Shared by every daemon through the state store."
        if drained
        else "Undrain SERVER (server_ip or server_id): it takes balance calls and agent "
        "logins again."
    )
    return command


drain_command = _drain_command(True)
undrain_command = _drain_command(False)
