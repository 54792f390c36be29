"""`vici-balancer files [NAME]`: the example config and deployment files the package carries."""

from __future__ import annotations

from importlib import resources

import click

from balancer.cli.common import fail, handle_errors

# balancer/shipped links to the top-level config/ directory; the wheel carries its files.
SHIPPED = resources.files("balancer") / "shipped"


@click.command("files")
@click.argument("name", required=False)
@handle_errors
def files(name: str | None) -> None:
    """List the files shipped with the package, or print one (e.g. `vici-balancer files
    vici-balancer.example.toml > /etc/vici-balancer.toml`)."""
    shipped = sorted((entry.name for entry in SHIPPED.iterdir() if entry.is_file()), key=str.lower)
    if name is None:
        for entry in shipped:
            click.echo(entry)
        return
    if name not in shipped:
        fail(f"no shipped file {name!r}; one of: {', '.join(shipped)}")
    click.echo((SHIPPED / name).read_text(encoding="utf-8"), nl=False)
