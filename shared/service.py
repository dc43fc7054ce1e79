"""The start-up and shutdown every service shares: settings, logs, ops server, signals."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from shared.db import refuse_default_password
from shared.jetstream import StreamMissing
from shared.logs import configure_logging
from shared.ops import Lifecycle, OpsServer
from shared.settings import Settings, SettingsError, load_settings
from shared.unreachable import CONNECT_FAILURES, RepeatedWarnings, ServerUnreachable

log = logging.getLogger(__name__)

Main = Callable[[Settings, Lifecycle], Awaitable[None]]

UNREACHABLE_RETRY_S = 1.0


def require(value: str, variable: str) -> str:
    if not value:
        raise SettingsError(variable, "must be set for this service (see README, Configuration)")
    return value


async def run_together(jobs: Iterable[Coroutine[Any, Any, None]], lifecycle: Lifecycle) -> None:
    """Run a service's parts as tasks until all return; the first to fail stops the others
    (through ``lifecycle``), and its error is raised once they have finished."""
    tasks = [asyncio.create_task(job) for job in jobs]
    if not tasks:
        return
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in done:
        if task.exception() is not None:
            lifecycle.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise task.exception()  # type: ignore[misc]
    await asyncio.gather(*tasks)


def _exit_cleanly(signum: int, frame: object) -> None:
    # Until the event loop takes over SIGTERM, there is nothing in flight to drain.
    sys.exit(0)


def tune_gc() -> None:
    """Services allocate many short-lived objects per message (envelopes, events, rows); with
    CPython's default thresholds the cyclic collector ran every 700 allocations and cost more
    than building the objects (measured: 3.4 -> 1.5 us per event built; bench/README.md).
    Everything imported so far is frozen out of the collector's sight, and young collections
    wait for 50,000 allocations. The hot structs are not tracked at all (``gc=False``)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop, asyncio's where uvloop does not exist (Windows).

    Measured in the same bench run (2026-12-03, 2-core Xeon, 50,000 transactions end to end):
    every Python service spent less CPU on uvloop, 7.5% less in all (ingester 8.3 -> 7.7 s,
    each projector 3.1 -> 2.8-2.9 s), end to end 2,280 -> 2,434 events/s, latency p99 at
    1,000/s 218 -> 164 ms.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def event_loop_name() -> str:
    """The running loop's library: ``uvloop`` or ``asyncio`` (logged when a service starts)."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def run_service(name: str, main: Main) -> None:
    """Run ``main`` until it returns or SIGTERM/SIGINT; exit 0 on a clean stop, 2 on bad config,
    1 when a stream it needs is missing."""
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        settings = load_settings()
        for url, variable in ((settings.database_url, "DATABASE_URL"), (settings.nats_url, "NATS_URL")):
            refuse_default_password(url, variable, allowed=settings.allow_default_passwords)
    except SettingsError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(name, settings.log_level)
    tune_gc()
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(name, main, settings))
    except SettingsError as exc:
        log.error("configuration error: %s", exc)
        sys.exit(2)
    except StreamMissing as exc:
        log.error("%s", exc)
        sys.exit(1)
    log.info("stopped")


async def _serve(name: str, main: Main, settings: Settings) -> None:
    lifecycle = Lifecycle()
    lifecycle.install_signal_handlers()
    ops = OpsServer(lifecycle, settings.metrics_port, settings.metrics_host)
    await ops.start()
    log.info(
        "starting %s", name, extra={"metrics_port": settings.metrics_port, "event_loop": event_loop_name()}
    )
    running = asyncio.create_task(start_when_reachable(main, settings, lifecycle))
    stop = asyncio.create_task(lifecycle.stopping.wait())
    try:
        await asyncio.wait({running, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not running.done() and not lifecycle.started:
            # Stopped while still starting (waiting for a server, say): nothing is in flight.
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            return
        await running
    finally:
        stop.cancel()
        await ops.stop()


async def start_when_reachable(main: Main, settings: Settings, lifecycle: Lifecycle) -> None:
    """Run ``main``; while a server it needs at start does not answer, start again every
    UNREACHABLE_RETRY_S, saying so in one line (repeated at most every 30 s with a count)."""
    warnings = RepeatedWarnings(log)
    while True:
        try:
            await main(settings, lifecycle)
            return
        except ServerUnreachable as exc:
            if lifecycle.started:
                raise  # not at start: the service's own error handling missed it
            CONNECT_FAILURES.labels(exc.server.lower()).inc()
            warnings.warning(f"{exc}; retrying every {UNREACHABLE_RETRY_S}s")
        if await lifecycle.sleep(UNREACHABLE_RETRY_S):
            return
