"""Commands against Purple Flea's documented contract: what is sent, what is recorded, and what
is refused. A small real HTTP server plays Purple Flea, answering what each test tells it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal

import nats
import pytest
from aiohttp import web

from services.writer.commands import CommandHandler
from services.writer.purpleflea import PurpleFleaCommands
from shared.commands import Code
from shared.envelope import bet_event_id, ingested_event_id
from shared.events import AgentRegistered, FundsDeposited
from shared.jetstream import Topology
from shared.ledger_client import LedgerClient
from shared.ops import Lifecycle
from shared.settings import AgentCredential, Settings
from shared.store import EventStore, NewEvent

LINKED = "agent-linked"
LOCAL = "agent-local"


@dataclass
class FakePurpleFlea:
    """Answers ``POST /bet`` and ``POST /faucet/claim`` with ``answers[path]``; keeps requests."""

    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    requests: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, await request.read(), dict(request.headers)))
        status, body = self.answers[request.path]
        return web.Response(status=status, body=body, content_type="application/json")


@pytest.fixture
async def purpleflea() -> AsyncIterator[tuple[FakePurpleFlea, str]]:
    fake = FakePurpleFlea()
    app = web.Application()
    app.router.add_post("/bet", fake.handle)
    app.router.add_post("/faucet/claim", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def client(
    settings: Settings,
    store: EventStore,
    topology: Topology,
    js_streams: nats.NATS,
    purpleflea: tuple[FakePurpleFlea, str],
) -> AsyncIterator[LedgerClient]:
    _, url = purpleflea
    api = PurpleFleaCommands(
        url,
        f"{url}/faucet",
        (AgentCredential(LINKED, "secret-key"),),
        from_simulator=False,
        timeout_s=5,
        budget_s=2,
    )
    lifecycle = Lifecycle()
    nc = await nats.connect(settings.nats_url)
    handler = CommandHandler(nc, store, topology, settings, lifecycle, api)
    task = asyncio.create_task(handler.run())
    await nc.flush()
    await asyncio.sleep(0)
    await nc.flush()
    for agent in (LINKED, LOCAL):
        await store.append(
            agent,
            "agent",
            [
                NewEvent.of(AgentRegistered(name=agent)),
                NewEvent.of(FundsDeposited(amount=Decimal(100), asset="PFLEA")),
            ],
            expected_version=0,
        )
    yield LedgerClient(js_streams, topology, timeout_s=10)
    lifecycle.stop()
    await task
    await api.close()
    await nc.close()


async def test_a_won_bet_sends_the_exact_amount_and_records_the_bet_and_its_payout(
    client: LedgerClient, store: EventStore, purpleflea: tuple[FakePurpleFlea, str]
) -> None:
    fake, _ = purpleflea
    fake.answers["/bet"] = (200, b'{"bet_id":"b-77","outcome":"win","payout":5.000000000000000001}')
    command_id = uuid.uuid4()
    reply = await client.place_bet(LINKED, "dice", "2.500000000000000001", command_id=command_id)
    assert reply.accepted, reply.reason
    path, body, headers = fake.requests[-1]
    assert path == "/bet"
    assert body == b'{"agent_id":"agent-linked","game":"dice","amount":2.500000000000000001}'
    assert headers["Authorization"] == "Bearer secret-key"
    assert headers["Idempotency-Key"] == str(command_id)
    assert (reply.bet_id, reply.won, reply.payout) == ("b-77", True, Decimal("5.000000000000000001"))
    events = (await store.read_stream(LINKED))[2:]
    assert [(e.event_id, e.event_type) for e in events] == [
        (bet_event_id(LINKED, "b-77", won=False), "BetPlaced"),
        (bet_event_id(LINKED, "b-77", won=True), "BetWon"),
    ]
    placed, won = (e.decode() for e in events)
    assert (placed.amount, placed.bet_id, placed.game) == (Decimal("2.500000000000000001"), "b-77", "dice")
    assert (won.amount, won.bet_id) == (Decimal("5.000000000000000001"), "b-77")
    assert {e.meta()["origin"] for e in events} == {"purpleflea"}


@pytest.mark.parametrize(
    "answer",
    [
        b'{"bet_id":"b-1","outcome":"push","payout":0}',
        b'{"bet_id":"b-1","outcome":"win","payout":"NaN"}',
        b'{"bet_id":"b-1","outcome":"win","payout":0}',
        b"<html>oops</html>",
    ],
)
async def test_an_undocumented_bet_answer_fails_clearly_and_records_nothing(
    client: LedgerClient, store: EventStore, purpleflea: tuple[FakePurpleFlea, str], answer: bytes
) -> None:
    fake, _ = purpleflea
    fake.answers["/bet"] = (200, answer)
    reply = await client.place_bet(LINKED, "dice", "1")
    assert reply.status == "failed" and reply.code == Code.UPSTREAM_BAD_ANSWER, reply
    assert len(await store.read_stream(LINKED)) == 2


async def test_a_claim_records_the_faucets_amount_under_the_faucet_feeds_id(
    client: LedgerClient, store: EventStore, purpleflea: tuple[FakePurpleFlea, str]
) -> None:
    fake, _ = purpleflea
    fake.answers["/faucet/claim"] = (200, b'{"success":true,"amount":0.25,"tx_id":"f-9"}')
    reply = await client.claim_faucet(LINKED)
    assert reply.accepted and reply.tx_ids == ("f-9",), reply
    assert fake.requests[-1][1] == b'{"agent_id":"agent-linked"}'
    [event] = (await store.read_stream(LINKED))[2:]
    assert event.event_id == ingested_event_id("faucet", LINKED, "f-9")
    claimed = event.decode()
    assert (claimed.amount, claimed.tx_id) == (Decimal("0.25"), "f-9")


async def test_a_refused_claim_is_a_rejection_and_records_nothing(
    client: LedgerClient, store: EventStore, purpleflea: tuple[FakePurpleFlea, str]
) -> None:
    fake, _ = purpleflea
    fake.answers["/faucet/claim"] = (200, b'{"success":false,"amount":0,"tx_id":null,"error":"cooldown"}')
    reply = await client.claim_faucet(LINKED)
    assert reply.status == "rejected" and reply.code == Code.UPSTREAM_REJECTED
    assert "cooldown" in (reply.reason or "")
    assert len(await store.read_stream(LINKED)) == 2


async def test_a_lost_answer_is_an_unknown_outcome_not_a_blind_retry(
    client: LedgerClient, store: EventStore, purpleflea: tuple[FakePurpleFlea, str]
) -> None:
    fake, _ = purpleflea
    fake.answers["/bet"] = (502, b"bad gateway")
    reply = await client.place_bet(LINKED, "dice", "1")
    assert reply.status == "failed" and reply.code == Code.OUTCOME_UNKNOWN
    assert not reply.retryable
    assert len(fake.requests) == 1  # sent once: the documented API promises no idempotency
    assert len(await store.read_stream(LINKED)) == 2


async def test_a_linked_agent_cannot_invent_a_withdrawal_or_escrow_that_the_feed_would_report_again(
    client: LedgerClient, store: EventStore
) -> None:
    withdraw = await client.withdraw_funds(LINKED, "1", "PFLEA", "0xabc")
    lock = await client.lock_escrow(LINKED, "1", "PFLEA", "e-1")
    assert withdraw.code == lock.code == Code.NOT_ON_PURPLEFLEA
    assert len(await store.read_stream(LINKED)) == 2


async def test_a_standalone_agents_commands_are_marked_local(client: LedgerClient, store: EventStore) -> None:
    replies = [
        await client.place_bet(LOCAL, "dice", "1"),
        await client.claim_faucet(LOCAL),
        await client.withdraw_funds(LOCAL, "1", "PFLEA", "0xabc"),
    ]
    assert all(r.accepted for r in replies), [r.reason for r in replies]
    events = (await store.read_stream(LOCAL))[2:]
    assert [e.event_type for e in events] == ["BetPlaced", "FaucetClaimed", "FundsWithdrawn"]
    assert {e.meta()["origin"] for e in events} == {"local"}
