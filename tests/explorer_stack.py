"""The explorer on real servers for its tests: a seeded log, projected read models, the web app
serving on 127.0.0.1 as the read-only role, and a way to commit one more event the way the
pipeline does (append, project, relay to NATS)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client

from services.projectors.apply import apply_batch
from services.web.app import make_app
from services.web.auth import Gate
from shared.db import PROJECTOR_ROLE, READER_ROLE, create_pool, role_dsn
from shared.events import Event
from shared.jetstream import Topology
from shared.nats_agents import AgentRegistry, read_login
from shared.projections.registry import PROJECTIONS
from shared.quarantine import Quarantine
from shared.store import EventStore, NewEvent, StreamEvent
from shared.wire import DeliveredEvent, event_message
from tests.conftest import SERVICE_PASSWORD
from tests.reference import generate
from tests.test_projections import all_events, deliver_shuffled

TOKEN = "operator-token-for-tests"
AGENTS = 3
SEED = 18


@dataclass
class ExplorerStack:
    url: str
    store: EventStore
    projector_pool: asyncpg.Pool
    reader_pool: asyncpg.Pool
    nc: Client
    topology: Topology
    data_dir: Path

    async def commit(self, agent_id: str, event: Event) -> DeliveredEvent:
        """Append ``event`` to the agent's stream, project it and relay it, as the pipeline does."""
        await self.store.append(agent_id, "agent", [NewEvent.of(event)], None)
        (recorded,) = await self.store.read_stream(agent_id, from_version=await self.version(agent_id))
        delivered = DeliveredEvent.of(recorded)
        for name, model in PROJECTIONS.items():
            async with self.projector_pool.acquire() as conn, conn.transaction():
                await apply_batch(
                    conn, model, [delivered], Quarantine(self.projector_pool, f"projector:{name}")
                )
        subject, payload, headers = event_message(self.topology, recorded)
        await self.nc.publish(subject, payload, headers=headers)
        await self.nc.flush()
        return delivered

    async def version(self, agent_id: str) -> int:
        return await self.store.stream_version(agent_id)

    def add_agent(self, agent_id: str) -> str:
        """Credentials for ``agent_id`` (``pflea agents add``); returns its password."""
        path = AgentRegistry(self.data_dir, self.topology.namespace).add(agent_id, "nats://127.0.0.1:4222")
        return read_login(path).nats_password


async def seed(store: EventStore, projector_pool: asyncpg.Pool, events: int = 600) -> list[str]:
    """A generated history over a few agents, with its read models; the agents' ids."""
    items: list[StreamEvent] = generate(SEED, agents=AGENTS, events=events)
    for start in range(0, len(items), 200):
        await store.append_batch(items[start : start + 200])
    await deliver_shuffled(projector_pool, await all_events(store), SEED)
    return sorted({i.stream_id for i in items})


@pytest.fixture
async def explorer(
    database_url: str, store: EventStore, nats_url: str, namespace: str, tmp_path: Path
) -> AsyncIterator[ExplorerStack]:
    reader = await create_pool(role_dsn(database_url, READER_ROLE, SERVICE_PASSWORD))
    projector = await create_pool(role_dsn(database_url, PROJECTOR_ROLE, SERVICE_PASSWORD))
    nc = await nats.connect(nats_url)
    topology = Topology(namespace)
    app = make_app(reader, nc, topology, Gate(TOKEN, tmp_path, namespace))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield ExplorerStack(f"http://127.0.0.1:{port}", store, projector, reader, nc, topology, tmp_path)
    finally:
        await runner.cleanup()
        await nc.close()
        await projector.close()
        await reader.close()
