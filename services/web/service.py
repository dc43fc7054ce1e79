"""Wire the explorer: Postgres as the read-only role, NATS as user ``web``, HTTP on PFLEA_WEB_HOST.

Read-only by construction: ``pflea_reader`` may SELECT and nothing else, and ``web`` may watch
events and look at streams, nothing else. Time travel and what-if fold in read-only
transactions (:mod:`shared.history`).
"""

from __future__ import annotations

import logging

from aiohttp import web

from services.web.app import make_app
from services.web.auth import Gate
from shared.db import READER_ROLE, service_pool
from shared.jetstream import Topology
from shared.nats_conn import connect_nats
from shared.ops import Lifecycle
from shared.service import require
from shared.settings import Settings

log = logging.getLogger(__name__)

# Open live pages are cancelled after this on SIGTERM; every other request is short.
SHUTDOWN_S = 5.0


async def run_web(settings: Settings, lifecycle: Lifecycle) -> None:
    dsn = require(settings.database_url, "DATABASE_URL")
    nats_url = require(settings.nats_url, "NATS_URL")
    token = require(settings.web_operator_token, "PFLEA_WEB_OPERATOR_TOKEN")
    pool = await service_pool(dsn, READER_ROLE, min_size=2, max_size=10)
    try:
        nc = await connect_nats(nats_url, "pflea-web")
    except BaseException:
        await pool.close()
        raise
    gate = Gate(token, settings.data_dir, settings.namespace)
    app = make_app(pool, nc, Topology(settings.namespace), gate)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_S)
    try:
        await runner.setup()
        await web.TCPSite(runner, settings.web_host, settings.web_port).start()
        log.info("explorer at http://%s:%d/", settings.web_host, settings.web_port)
        lifecycle.checks.append(lambda: nc.is_connected)
        lifecycle.ready = True
        await lifecycle.stopping.wait()
    finally:
        await runner.cleanup()
        await nc.close()
        await pool.close()
