"""The daemon's process lifecycle: signals (stop, force, reload) around `Daemon.serve()`.

Layering: `vici-balancer run` → `run(config)` → `serve_until_signalled` → `Daemon.serve()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from balancer.config import Config, load_config
from balancer.daemon import Daemon
from balancer.errors import BalancerError

log = logging.getLogger(__name__)


def _force_exit() -> None:
    """A second SIGINT: leave now, without waiting for anything."""
    os._exit(130)


async def serve_until_signalled(
    daemon: Daemon,
    config_path: Path | None,
    *,
    shutdown_timeout_s: float = 5.0,
    force_exit: Callable[[], None] = _force_exit,
) -> None:
    """Serve with the daemon's signal semantics.

    SIGTERM/SIGINT: ordered shutdown (stop deciding, finish the call in flight, release the lease,
    close AMI), cut short after ``shutdown_timeout_s``. A second SIGINT forces exit at once.
    SIGHUP: reload the configuration file; an invalid file is rejected with a log line and the
    running configuration kept.
    """
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stops = 0
    reloads: set[asyncio.Task[None]] = set()

    def on_stop(name: str) -> None:
        nonlocal stops
        stops += 1
        if stops == 1:
            log.info("%s received: shutting down", name)
            stop.set()
        elif name == "SIGINT":
            log.warning("second SIGINT: forcing exit")
            force_exit()

    async def reload() -> None:
        try:
            new = load_config(config_path)
        except BalancerError as exc:
            log.error("config reload rejected, keeping the running configuration: %s", exc)
            return
        for note in await daemon.reload(new):
            log.warning("config reload: %s", note)
        log.info("configuration reloaded from %s", config_path or "the default path")

    def on_hup() -> None:
        task = asyncio.create_task(reload(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    serving = asyncio.create_task(daemon.serve(stop), name="daemon")
    try:
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        done, _ = await asyncio.wait({serving}, timeout=shutdown_timeout_s)
        if not done:
            log.error(
                "shutdown took longer than %.0fs: cancelling what is left", shutdown_timeout_s
            )
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        elif serving.exception() is not None:
            raise serving.exception()  # type: ignore[misc]
    finally:
        for task in reloads:
            task.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)


def run(config: Config) -> None:
    """Blocking entry point for `vici-balancer run`: serve until SIGINT/SIGTERM."""
    path = Path(config.path) if config.path else None
    asyncio.run(serve_until_signalled(Daemon(config), path))
