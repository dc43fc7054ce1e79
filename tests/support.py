"""What the pipeline tests share beyond devstack: their services' environment, the simulator's
feeds and identities, and reading a whole stream."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from devstack.processes import service_env as devstack_service_env
from services.simulator.api import feed_paths
from services.simulator.feed import StoredTx
from shared.envelope import bet_event_id, ingested_event_id
from shared.settings import CASINO_FEED, Settings
from tests.conftest import SERVICE_PASSWORD

REPO = Path(__file__).resolve().parent.parent


def simulator_feeds(url: str) -> str:
    """``PURPLEFLEA_FEEDS`` for every feed the simulator at ``url`` serves."""
    return ",".join(f"{name}={url}{path}" for name, path in feed_paths().items())


def truth_event_id(tx: StoredTx) -> uuid.UUID:
    """The event id a well-formed simulator transaction must be stored under, written from the
    README's identity rule: a casino bet/win carrying ``bet_id`` by it, else (feed, agent, id)."""
    assert tx.id is not None and tx.malformed is None
    item = json.loads(tx.raw)
    if tx.feed == CASINO_FEED and tx.type in ("bet", "win") and "bet_id" in item:
        return bet_event_id(tx.agent_id, item["bet_id"], won=tx.type == "win")
    return ingested_event_id(tx.feed, tx.agent_id, tx.id)


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """A service's environment for this test's database, NATS and namespace."""
    # Redelivery after a SIGKILL waits for the ack deadline; keep it short in tests.
    extra = {"PFLEA_ACK_WAIT_S": "3", **extra}
    return devstack_service_env(
        settings.database_url, settings.nats_url, settings.namespace, SERVICE_PASSWORD, **extra
    )


async def stream_messages(
    js: JetStreamContext, stream: str, subjects: str, *, headers_only: bool = False
) -> list[Msg]:
    """Every message ``stream`` holds now, in order, read with an ephemeral consumer: a limits
    stream (PFLEA_EVENTS). PFLEA_TX is a work queue: it keeps only what is not stored yet, and
    refuses a second consumer whose filter overlaps the writer's."""
    total = int((await js.stream_info(stream)).state.messages)
    if total == 0:
        return []
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        headers_only=headers_only,
        inactive_threshold=30,
    )
    sub = await js.pull_subscribe(subjects, stream=stream, config=config)
    msgs: list[Msg] = []
    try:
        while len(msgs) < total:
            msgs += await sub.fetch(min(5000, total - len(msgs)), timeout=10)
    finally:
        await sub.unsubscribe()
    return msgs
