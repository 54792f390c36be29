"""What every command shares: the app context, one-line failures, exit codes, common options.

Exit codes: 0 ok, 1 failure at run time, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

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

    def __init__(self, config_path: Path | None, debug: bool = False) -> None:
        self.config_path = config_path
        self.debug = debug  # --debug: an unexpected error shows its traceback
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
    """Turn our own errors into one clear line and the right exit code; anything unexpected
    into one line naming what failed (exit 1), its traceback only with --debug."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(f"bad config: {exc}", EXIT_USAGE)
        except BalancerError as exc:
            fail(str(exc))
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            context = click.get_current_context(silent=True)
            app = context.find_object(AppContext) if context is not None else None
            if app is not None and app.debug:
                raise
            where = func.__name__.replace("_", "-")
            fail(
                f"{where} failed unexpectedly: {type(exc).__name__}: {exc}"
                " (run with --debug for the traceback)"
            )

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
