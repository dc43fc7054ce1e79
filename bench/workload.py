"""The data the scenarios push through: simulator transactions made into PFLEA_TX messages
exactly as the ingester makes them (batches of one agent's consecutive transactions), the same
transactions as events-shaped COPY rows, and a server-side generator for logs too large to
build in Python quickly."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from nats.js import JetStreamContext

from services.simulator import Simulator, SimulatorConfig
from shared.envelope import TxEnvelope, new_event
from shared.jetstream import Topology
from shared.settings import Settings
from shared.store import event_record
from shared.transactions import parse_transaction
from shared.wire import HDR_MSG_ID, TxMessage, tx_messages


@dataclass
class Workload:
    """``len(messages)`` transactions over ``agents`` agents, in one of two orders:

    - ``pages``: as the ingester publishes a backlog, one agent's page (up to
      ``PFLEA_INGEST_PAGE_LIMIT`` transactions) after another, so a batch of 1,000 spans a few
      streams;
    - ``live``: as steady traffic arrives, transaction n of every agent then n + 1, so a batch
      of 1,000 spans up to 1,000 streams (the worst case for per-stream work).
    """

    agents: int
    messages: list[TxMessage]  # as the ingester publishes them: batches of one agent's run
    envelopes: list[TxEnvelope]

    def __len__(self) -> int:
        return len(self.envelopes)

    def single_messages(self) -> list[TxMessage]:
        """One transaction per message (a batch of one): about the size of what the relay
        publishes per event, for the JetStream limits."""
        return [tx_messages([e])[0] for e in self.envelopes]

    def copy_records(self) -> list[tuple[Any, ...]]:
        """The rows the writer would COPY into ``events`` for these messages, in order."""
        versions: dict[str, int] = {}
        records = []
        for seq, env in enumerate(self.envelopes, 1):
            version = versions[env.agent_id] = versions.get(env.agent_id, 0) + 1
            records.append(event_record(env.agent_id, "agent", version, new_event(env, seq)))
        return records


ORDERS = ("pages", "live")


def build_workload(transactions: int, agents: int, order: str = "pages", seed: int = 7) -> Workload:
    per_agent = -(-transactions // agents)
    sim = Simulator(SimulatorConfig(seed=seed, agents=agents, backlog=per_agent, rate=0, history=per_agent))
    feeds = [sim.feed(agent_id).txs for agent_id in sim.feeds]
    step = Settings().ingest_page_limit if order == "pages" else 1
    envelopes: list[TxEnvelope] = []
    for start in range(0, per_agent, step):
        for txs in feeds:
            for tx in txs[start : start + step]:
                if len(envelopes) < transactions:
                    envelopes.append(parse_transaction(tx.raw, tx.agent_id, tx.feed))
    return Workload(agents, tx_messages(envelopes), envelopes)


async def publish_tx(js: JetStreamContext, topology: Topology, messages: list[TxMessage]) -> float:
    """Publish like the ingester (subject per agent, ``Nats-Msg-Id`` = event id), pipelined,
    and wait for every ack; returns the seconds it took."""
    started = time.perf_counter()
    futures = []
    for m in messages:
        futures.append(
            await js.publish_async(topology.tx_subject(m.agent_id), m.payload, headers={HDR_MSG_ID: m.msg_id})
        )
    await asyncio.gather(*futures)
    return time.perf_counter() - started


async def holds_events(conn: asyncpg.Connection, total: int) -> bool:
    """Whether ``events`` holds ``total`` rows: the last position first (an index probe), then
    ``count(*)`` once it could be true, so polling stays cheap."""
    if await conn.fetchval("SELECT coalesce(max(position), 0) FROM events") < total:
        return False
    return bool(await conn.fetchval("SELECT count(*) FROM events") >= total)


# A realistic mix (bets dominate) of the catalogue's events, chosen per event so that every
# agent sees every type; amounts are exact decimal strings.
_GENERATE_SQL = """
INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data, metadata, occurred_at)
SELECT uuidv7(),
       $3 || lpad((g % $4)::text, 5, '0'),
       'agent',
       k.kind,
       g / $4 + 1,
       jsonb_build_object('tx_id', 'bench-' || g,
                          'amount', (g % 9973 + 1)::text || '.' || lpad((g % 100)::text, 2, '0'),
                          'asset', (ARRAY['PFLEA', 'USDC', 'BTC'])[(g % 3) + 1]) || k.extra,
       jsonb_build_object('schema_version', k.sv, 'source', 'bench'),
       timestamptz '2025-01-01 00:00:00+00' + g * interval '1 second'
FROM generate_series($1::bigint, $2::bigint) AS g
JOIN (VALUES
    (0, 'FundsDeposited', 1, '{}'::jsonb),
    (1, 'BetPlaced', 2, '{"game": "dice"}'::jsonb),
    (2, 'BetPlaced', 2, '{"game": "crash"}'::jsonb),
    (3, 'BetWon', 1, '{"game": "dice"}'::jsonb),
    (4, 'FeeCharged', 1, '{}'::jsonb),
    (5, 'TradeExecuted', 1, '{"side": "buy", "instrument": "ETH", "quantity": "0.5"}'::jsonb),
    (6, 'FundsWithdrawn', 1, '{}'::jsonb),
    (7, 'EscrowLocked', 1, '{"escrow_id": "e-1"}'::jsonb),
    (8, 'EscrowReleased', 1, '{"escrow_id": "e-1"}'::jsonb),
    (9, 'AssetSwapped', 1, '{"to_asset": "USDC", "to_amount": "12.5"}'::jsonb)
) AS k(pick, kind, sv, extra) ON k.pick = ((g / $4) * 7 + g) % 10
"""


async def generate_log(
    conn: asyncpg.Connection, events: int, agents: int, prefix: str = "agent-", chunk: int = 100_000
) -> float:
    """Append ``events`` events over ``agents`` streams server-side, in ``chunk``-row transactions
    (through the real table, triggers and all); returns the seconds it took."""
    started = time.perf_counter()
    for first in range(0, events, chunk):
        last = min(first + chunk, events) - 1
        await conn.execute(_GENERATE_SQL, first, last, prefix, agents)
    return time.perf_counter() - started
