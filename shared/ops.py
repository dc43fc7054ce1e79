"""What every service has: /metrics, /healthz, /readyz, and a clean SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class Lifecycle:
    """Set ``stopping`` on SIGTERM/SIGINT; ``ready`` goes false while draining."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self._ready = False
        self.started = False  # ready at least once: from then on a stop drains
        self.checks: list[Callable[[], bool]] = []

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        if value and not self._ready:
            log.info("ready")
        self._ready = value
        self.started = self.started or value

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)

    def stop(self, sig: int | None = None) -> None:
        if not self.stopping.is_set():
            log.info("stopping", extra={"signal": signal.Signals(sig).name if sig else None})
        self.ready = False
        self.stopping.set()

    def healthy(self) -> bool:
        return all(check() for check in self.checks)

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop first; True if stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True


class OpsServer:
    """A small HTTP server for Prometheus and orchestrators; port 0 disables it."""

    def __init__(self, lifecycle: Lifecycle, port: int, host: str = "127.0.0.1") -> None:
        self.lifecycle = lifecycle
        self.port = port
        self.host = host
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        if not self.port:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        ok = self.lifecycle.healthy()
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = self.lifecycle.ready and not self.lifecycle.stopping.is_set()
        return web.json_response({"ready": ready}, status=200 if ready else 503)
