"""The aiohttp application and a way to run it inside the current event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from aiohttp import web

from . import admin, api
from .config import SimulatorConfig
from .epoch import feed_epoch
from .simulator import Simulator
from .state import SIMULATOR, STARTED_AT, STOPPING, advance_clock

# Between requests the feeds still grow in small steps, rather than all at once on the next poll.
TICK_S = 0.1
SHUTDOWN_TIMEOUT_S = 2.0


async def _clock(app: web.Application) -> AsyncIterator[None]:
    epoch = feed_epoch(app[SIMULATOR].config)
    since_epoch = max(0.0, time.time() - epoch) if epoch else 0.0
    app[STARTED_AT] = asyncio.get_running_loop().time() - since_epoch
    ticker = None
    if app[SIMULATOR].config.rate > 0:
        ticker = asyncio.create_task(_tick(app), name="simulator-clock")
    yield
    if ticker is not None:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


async def _tick(app: web.Application) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        advance_clock(app)


async def _release_hangs(app: web.Application) -> None:
    app[STOPPING].set()


def create_app(sim: Simulator) -> web.Application:
    """The simulator's HTTP app: the Purple Flea feed contract plus ``/admin`` ground truth."""
    app = web.Application()
    app[SIMULATOR] = sim
    app[STOPPING] = asyncio.Event()
    app.cleanup_ctx.append(_clock)
    app.on_shutdown.append(_release_hangs)
    api.add_routes(app)
    admin.add_routes(app)
    return app


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def running_simulator(
    config: SimulatorConfig, simulator: Simulator | None = None
) -> AsyncIterator[str]:
    """Serve a simulator on ``config.host``/``config.port`` (0: a free port); yields its base URL.

    Pass ``simulator`` to serve one you built (and keep a handle on); by default a new one is
    made from ``config``. The server stops when the block exits.
    """
    app = create_app(simulator if simulator is not None else Simulator(config))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = runner.addresses[0][1]
        yield _url(config.host, port)
    finally:
        await runner.cleanup()
