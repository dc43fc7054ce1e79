"""Wire one projector process: ``python -m services.projectors <name>``."""

from __future__ import annotations

from services.projectors.runner import ProjectorRunner
from shared.db import PROJECTOR_ROLE, service_pool
from shared.jetstream import Topology
from shared.nats_conn import connect_nats
from shared.ops import Lifecycle
from shared.projections.registry import projection
from shared.service import require
from shared.settings import Settings


def projector_main(name: str):  # noqa: ANN201 - returns the service's main coroutine function
    model = projection(name)

    async def run_projector(settings: Settings, lifecycle: Lifecycle) -> None:
        pool = await service_pool(
            require(settings.database_url, "DATABASE_URL"),
            PROJECTOR_ROLE,
            min_size=1,
            max_size=4,
        )
        nc = await connect_nats(require(settings.nats_url, "NATS_URL"), f"pflea-projector-{name}")
        try:
            js = nc.jetstream()
            topology = Topology(settings.namespace)
            runner = ProjectorRunner(model, pool, js, topology, settings, lifecycle)
            lifecycle.checks.append(lambda: nc.is_connected)
            lifecycle.ready = True
            await runner.run()
        finally:
            await nc.drain()
            await pool.close()

    return run_projector
