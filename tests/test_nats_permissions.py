"""Who may do what on NATS, on a real nats-server running the accounts ``pflea up`` runs.

The ledger's account PFLEA holds the services, ``operator`` (looks) and ``admin`` (manages
streams); agents are users of the AGENTS account (``pflea agents add``), each limited to its own
subjects, and the writer answers a command only when nats-server stamped it as sent by the
subject's agent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from devstack.embedded import EmbeddedNats
from devstack.processes import wait_until
from services.writer.commands import CommandHandler
from services.writer.partitions import PartitionedAppends
from shared.atomic_batch import publish_atomic
from shared.commands import Code, RegisterAgent
from shared.db import OWNER_ROLE, role_dsn
from shared.jetstream import (
    StreamMissing,
    StreamSettings,
    Topology,
    declare_ingest_bucket,
    declare_streams,
    ensure_ingest_bucket,
    ensure_streams,
    ingest_bucket,
    pull_consumer_config,
    writer_consumer_config,
)
from shared.ledger_client import CommandNotPermitted, LedgerClient
from shared.membership import Membership
from shared.nats_agents import (
    AgentLogin,
    AgentRegistry,
    connect_agent,
    credential_path,
    read_login,
    registry_path,
    render_users,
    users_conf_path,
)
from shared.nats_auth import USERS, agent_user, render_accounts, user_url
from shared.ops import Lifecycle
from shared.pipeline_status import jetstream_status
from shared.settings import Settings
from shared.stack import StackInfo, clear_stack, write_stack
from shared.store import EventStore
from shared.wire import decode_reply, encode_command
from tests.conftest import SERVICE_PASSWORD
from tests.support import REPO

TOPOLOGY = Topology("pflea")  # the namespace the rendered permissions name
# An AGENTS user given more than an agent ever is: it may publish every agent's commands, as a
# mistake in the users file would allow. The writer must still refuse it.
ROGUE = {"user": "agent-rogue", "password": "rogue-pw", "permissions": {"publish": ">", "subscribe": ">"}}


@dataclass
class Session:
    nc: Client
    errors: asyncio.Queue[Exception] = field(default_factory=asyncio.Queue)

    async def violation(self, subject: str, timeout: float = 5.0) -> str:
        """The server's permissions violation naming ``subject``; fails if none comes in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            try:
                error = await asyncio.wait_for(self.errors.get(), remaining)
            except TimeoutError:
                break
            text = str(error).lower()
            if "permissions violation" in text and f'"{subject.lower()}"' in text:
                return text
        pytest.fail(f"no permissions violation for {subject!r} within {timeout}s")


@dataclass
class Ledger:
    """An embedded nats-server with the ledger's accounts, and the data folder of its agents."""

    server: EmbeddedNats
    data_dir: Path
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        return user_url(self.server.url, user, self.passwords[user])

    @property
    def registry(self) -> AgentRegistry:
        return AgentRegistry(self.data_dir, TOPOLOGY.namespace)

    def reload(self) -> None:
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGHUP)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    data_dir = tmp_path_factory.mktemp("ledger")
    passwords = {user: f"pw-{user}-{uuid.uuid4().hex[:8]}" for user in USERS}
    AgentRegistry(data_dir, TOPOLOGY.namespace).render()  # as `pflea up` does: `users: []`
    server = EmbeddedNats(
        data_dir / "nats", config=render_accounts(TOPOLOGY.namespace, passwords), durable=False
    )
    server.start()
    try:
        yield Ledger(server, data_dir, passwords)
    finally:
        server.stop()


@pytest.fixture
async def login(ledger: Ledger) -> AsyncIterator[Callable[..., Awaitable[Session]]]:
    sessions: list[Session] = []

    async def connect(user: str | AgentLogin) -> Session:
        session = Session(nc=None)  # type: ignore[arg-type]

        async def on_error(error: Exception) -> None:
            session.errors.put_nowait(error)

        options: dict[str, Any] = dict(error_cb=on_error, allow_reconnect=False, connect_timeout=5)
        if isinstance(user, AgentLogin):
            session.nc = await connect_agent(user, **options)
        else:
            session.nc = await nats.connect(ledger.url(user), **options)
        sessions.append(session)
        return session

    yield connect
    for session in sessions:
        await session.nc.close()


async def _settled(login: AgentLogin) -> bool:
    """Whether the server accepts ``login`` now (a reload is applied after SIGHUP, not at it)."""
    try:
        nc = await connect_agent(login, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    except (OSError, nats.errors.Error):  # refused, or cut off while the server reloads
        return False
    await nc.close()
    return True


async def _jetstream_answers(ledger: Ledger) -> bool:
    """Whether the account's JetStream API answers again. A reload re-enables JetStream in the
    accounts last, after it has let in the new logins (nats-server's reloadAuthorization), so
    until then a JetStream request can get 503 no responders."""
    try:
        nc = await nats.connect(ledger.url("admin"), allow_reconnect=False, connect_timeout=2)
    except (OSError, nats.errors.Error):
        return False
    try:
        await nc.jetstream(timeout=2).account_info()
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
        return False
    finally:
        await nc.close()
    return True


@pytest.fixture
async def add_agent(ledger: Ledger) -> Callable[[], Awaitable[AgentLogin]]:
    """Register a new agent (as `pflea agents add` does) and reload the server."""

    async def add() -> AgentLogin:
        agent_id = f"a{uuid.uuid4().hex[:8]}"
        path = ledger.registry.add(agent_id, ledger.server.url)
        ledger.reload()
        login = read_login(path)
        await wait_until(lambda: _settled(login), 10, f"the server accepting {agent_id}", 0.1)
        await wait_until(lambda: _jetstream_answers(ledger), 10, "JetStream answering after the reload", 0.1)
        return login

    return add


@pytest.fixture
async def streams(ledger: Ledger) -> None:
    admin = await nats.connect(ledger.url("admin"))
    try:
        await declare_streams(admin.jetstream(), TOPOLOGY, duplicate_window_s=60)
        await declare_ingest_bucket(admin.jetstream(), TOPOLOGY, lease_ttl_s=6)
    finally:
        await admin.close()


@pytest.fixture
async def writer(
    ledger: Ledger, settings: Settings, store: EventStore, login: Callable[..., Awaitable[Session]]
) -> AsyncIterator[None]:
    """The writer's command handler, logged in as the writer, checking every command's sender."""
    checked = msgspec.structs.replace(settings, namespace=TOPOLOGY.namespace, command_auth=True)
    session = await login("writer")
    lifecycle = Lifecycle()
    task = asyncio.create_task(CommandHandler(session.nc, store, TOPOLOGY, checked, lifecycle).run())
    await asyncio.sleep(0)
    await session.nc.flush()
    yield
    lifecycle.stop()
    await task


# --- agents ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["WithdrawFunds", "PlaceBet"])
async def test_agent_b_cannot_send_commands_for_agent_a(
    add_agent: Callable[[], Awaitable[AgentLogin]], login: Any, writer: None, store: EventStore, command: str
) -> None:
    a, b = await add_agent(), await add_agent()
    session = await login(b)
    subject = TOPOLOGY.command_subject(a.agent_id, command)
    await session.nc.publish(subject, b"{}")
    await session.nc.flush()
    assert "publish" in await session.violation(subject)
    # The client says so instead of waiting for a writer that never hears of it.
    client = LedgerClient(session.nc, TOPOLOGY, timeout_s=2, attempts=1)
    with pytest.raises(CommandNotPermitted, match="permissions violation"):
        await client.withdraw_funds(a.agent_id, "1", "PFLEA", "0xabc")
    assert await store.read_stream(a.agent_id) == []


@pytest.mark.parametrize("subject", ["{ns}.events.{a}.>", "_INBOX.{a}.>", "{ns}.events.>", "_INBOX.>"])
async def test_agent_b_cannot_read_agent_a_events_or_replies(
    add_agent: Callable[[], Awaitable[AgentLogin]], login: Any, subject: str
) -> None:
    a, b = await add_agent(), await add_agent()
    subject = subject.format(ns=TOPOLOGY.namespace, a=a.agent_id)
    session = await login(b)
    await session.nc.subscribe(subject)
    await session.nc.flush()
    assert "subscription" in await session.violation(subject)


async def test_an_agent_sends_its_commands_gets_replies_and_receives_its_own_events(
    add_agent: Callable[[], Awaitable[AgentLogin]], login: Any, writer: None, streams: None
) -> None:
    a, b = await add_agent(), await add_agent()
    agent = await login(a)
    reply = await LedgerClient(agent.nc, TOPOLOGY, timeout_s=5).register_agent(a.agent_id, "A")
    assert reply.status == "accepted", reply

    received: list[str] = []

    async def on_event(msg: Any) -> None:
        received.append(msg.subject)

    await agent.nc.subscribe(f"{TOPOLOGY.namespace}.events.{a.agent_id}.>", cb=on_event)
    await agent.nc.flush()
    relay = await login("writer")  # the relay logs in as the writer, and publishes atomic batches
    batch = [
        (TOPOLOGY.event_subject(owner, "FundsDeposited"), b"{}", {}) for owner in (b.agent_id, a.agent_id)
    ]
    assert (await publish_atomic(relay.nc.jetstream(), batch, timeout=5)).count == 2
    await wait_until(lambda: received, 5, "agent A's event")
    await asyncio.sleep(0.2)  # B's event, published first, would have arrived by now
    assert received == [TOPOLOGY.event_subject(a.agent_id, "FundsDeposited")]
    assert agent.errors.empty()


async def test_the_writer_refuses_a_command_whose_sender_is_not_the_subjects_agent(
    ledger: Ledger, add_agent: Callable[[], Awaitable[AgentLogin]], writer: None, store: EventStore
) -> None:
    a = await add_agent()
    users_conf_path(ledger.data_dir).write_text(render_users([*ledger.registry.users(), ROGUE]))
    ledger.reload()
    rogue_url = user_url(ledger.server.url, "agent-rogue", "rogue-pw")
    try:
        nc = await wait_until(lambda: _connect_or_none(rogue_url), 10, "the rogue user", 0.1)
        command = RegisterAgent(command_id=uuid.uuid4(), name="not yours")
        subject = TOPOLOGY.command_subject(a.agent_id, "RegisterAgent")
        # A header of its own claiming to be A: the server replaces it with the true sender.
        forged = {"Nats-Request-Info": json.dumps({"acc": "AGENTS", "user": agent_user(a.agent_id)})}
        try:
            replies = [
                decode_reply((await nc.request(subject, encode_command(command), timeout=5, headers=h)).data)
                for h in (None, forged)
            ]
        finally:
            await nc.close()
        for reply in replies:
            assert (reply.status, reply.code) == ("rejected", Code.FORBIDDEN)
            assert f"agent-rogue of account AGENTS may not send commands for {a.agent_id}" in (
                reply.reason or ""
            )
        assert await store.read_stream(a.agent_id) == []
        stored = await store.pool.fetchval(
            "SELECT count(*) FROM command_results WHERE command_id = $1", command.command_id
        )
        assert stored == 0
    finally:
        ledger.registry.render()
        ledger.reload()


async def _connect_or_none(url: str) -> Client | None:
    try:
        return await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    except (OSError, nats.errors.Error):
        return None


@pytest.mark.parametrize("command_auth", [True, False])
async def test_without_accounts_a_command_has_no_sender_and_is_forbidden_unless_auth_is_off(
    settings: Settings, store: EventStore, js_streams: Client, topology: Topology, command_auth: bool
) -> None:
    # The test suite's plain server: no accounts, so no Nats-Request-Info on any command.
    lifecycle = Lifecycle()
    nc = await nats.connect(settings.nats_url)
    checked = msgspec.structs.replace(settings, command_auth=command_auth)
    task = asyncio.create_task(CommandHandler(nc, store, topology, checked, lifecycle).run())
    try:
        await asyncio.sleep(0)
        await nc.flush()
        reply = await LedgerClient(js_streams, topology, timeout_s=5).register_agent("plain", "P")
    finally:
        lifecycle.stop()
        await task
        await nc.close()
    if command_auth:
        assert (reply.status, reply.code) == ("rejected", Code.FORBIDDEN)
        assert "carries no Nats-Request-Info" in (reply.reason or "")
        assert await store.read_stream("plain") == []
    else:
        assert reply.status == "accepted"


async def test_a_removed_agent_is_disconnected_and_refused_after_the_reload(
    ledger: Ledger, add_agent: Callable[[], Awaitable[AgentLogin]], login: Any
) -> None:
    a = await add_agent()
    held = await login(a)
    ledger.registry.remove(a.agent_id)
    assert not credential_path(ledger.data_dir, a.agent_id).exists()
    ledger.reload()
    await wait_until(lambda: held.nc.is_closed or not held.nc.is_connected, 10, "the server dropping A")
    assert not await _settled(a)


# --- operator, admin, services ------------------------------------------------------------------


async def test_the_operator_looks_at_streams_and_events_but_cannot_command_or_delete(
    ledger: Ledger, add_agent: Callable[[], Awaitable[AgentLogin]], login: Any, streams: None
) -> None:
    operator = await login("operator")
    js = operator.nc.jetstream()
    # What `pflea status` asks: streams, and the lag of the services' consumers.
    assert (await js.stream_info(TOPOLOGY.events_stream)).config.name == TOPOLOGY.events_stream
    durable = TOPOLOGY.projector_durable("balance")
    config = pull_consumer_config(durable, TOPOLOGY.events_filter, ack_wait_s=30, max_deliver=3)
    await (await login("projector")).nc.jetstream().add_consumer(TOPOLOGY.events_stream, config)
    assert (await js.consumer_info(TOPOLOGY.events_stream, durable)).num_pending is not None
    events = await operator.nc.subscribe(TOPOLOGY.events_filter)
    await operator.nc.flush()
    relay = await login("writer")
    subject = TOPOLOGY.event_subject("someone", "FundsDeposited")
    await relay.nc.jetstream().publish(subject, b"{}")
    assert (await events.next_msg(timeout=5)).subject == subject

    a = await add_agent()
    for forbidden in (
        TOPOLOGY.command_subject(a.agent_id, "WithdrawFunds"),
        f"$JS.API.STREAM.DELETE.{TOPOLOGY.events_stream}",
        f"$JS.API.STREAM.PURGE.{TOPOLOGY.events_stream}",
        f"$JS.API.STREAM.CREATE.{TOPOLOGY.namespace.upper()}_OTHER",
    ):
        await operator.nc.publish(forbidden, b"{}", reply=operator.nc.new_inbox())
        await operator.nc.flush()
        await operator.violation(forbidden)
    assert (await js.stream_info(TOPOLOGY.events_stream)).state.messages >= 1


async def test_the_explorer_watches_events_and_reads_stream_status_and_nothing_else(
    ledger: Ledger, add_agent: Callable[[], Awaitable[AgentLogin]], login: Any, streams: None
) -> None:
    web = await login("web")
    durable = TOPOLOGY.projector_durable("pnl")
    config = pull_consumer_config(durable, TOPOLOGY.events_filter, ack_wait_s=30, max_deliver=3)
    await (await login("projector")).nc.jetstream().add_consumer(TOPOLOGY.events_stream, config)
    # The operations page: what `pflea status` shows, as the explorer's own user.
    status = await jetstream_status(web.nc, TOPOLOGY)
    assert {s["stream"] for s in status["streams"] if s["messages"] is not None} == {
        TOPOLOGY.tx_stream,
        TOPOLOGY.events_stream,
    }
    assert any(c["consumer"] == durable and c["pending"] is not None for c in status["consumers"])
    # Live pages: committed events of any agent.
    events = await web.nc.subscribe(TOPOLOGY.events_filter)
    await web.nc.flush()
    subject = TOPOLOGY.event_subject("someone", "BetWon")
    await (await login("writer")).nc.jetstream().publish(subject, b"{}")
    assert (await events.next_msg(timeout=5)).subject == subject

    a = await add_agent()
    for forbidden in (
        TOPOLOGY.event_subject("someone", "FundsDeposited"),
        "pflea.tx.someone",
        TOPOLOGY.command_subject(a.agent_id, "WithdrawFunds"),
        f"$JS.API.STREAM.DELETE.{TOPOLOGY.events_stream}",
        f"$JS.API.STREAM.PURGE.{TOPOLOGY.tx_stream}",
        f"$JS.API.STREAM.MSG.GET.{TOPOLOGY.events_stream}",
        f"$JS.API.CONSUMER.CREATE.{TOPOLOGY.events_stream}.spy",
        f"$JS.API.CONSUMER.DELETE.{TOPOLOGY.events_stream}.{durable}",
    ):
        await web.nc.publish(forbidden, b"{}", reply=web.nc.new_inbox())
        await web.nc.flush()
        await web.violation(forbidden)
    await web.nc.subscribe("pflea.tx.>")
    await web.nc.flush()
    await web.violation("pflea.tx.>")


async def test_the_admin_manages_streams_but_publishes_nothing_into_the_ledger(
    ledger: Ledger, login: Any, streams: None
) -> None:
    admin = await login("admin")
    js = admin.nc.jetstream()
    name = f"{TOPOLOGY.namespace.upper()}_SCRATCH"
    await js.add_stream(StreamConfig(name=name, subjects=["scratch.>"]))
    await js.update_stream(StreamConfig(name=name, subjects=["scratch.>"], max_msgs=10))
    await js.purge_stream(name)
    assert await js.delete_stream(name)
    for subject in (
        TOPOLOGY.command_subject("anyone", "WithdrawFunds"),
        TOPOLOGY.event_subject("anyone", "FundsDeposited"),
        TOPOLOGY.tx_subject("anyone"),
    ):
        await admin.nc.publish(subject, b"{}")
        await admin.nc.flush()
        await admin.violation(subject)


@pytest.mark.parametrize("user", ["ingester", "writer", "projector"])
@pytest.mark.parametrize("api", ["DELETE", "PURGE", "UPDATE", "CREATE"])
async def test_no_service_user_may_delete_purge_update_or_create_a_stream(
    ledger: Ledger, login: Any, streams: None, user: str, api: str
) -> None:
    session = await login(user)
    stream = TOPOLOGY.events_stream
    admin = (await login("admin")).nc.jetstream()
    before = await admin.stream_info(stream)
    shrunk = msgspec.json.encode({"name": stream, "subjects": [TOPOLOGY.events_filter], "max_msgs": 1})
    subject = f"$JS.API.STREAM.{api}.{stream}"
    await session.nc.publish(subject, shrunk, reply=session.nc.new_inbox())
    await session.nc.flush()
    await session.violation(subject)
    after = await admin.stream_info(stream)
    assert (after.config.max_msgs, after.state.messages) == (before.config.max_msgs, before.state.messages)


async def test_a_service_finds_existing_streams_and_names_the_fix_for_a_missing_one(
    ledger: Ledger, login: Any, streams: None
) -> None:
    ingester = (await login("ingester")).nc.jetstream()
    await ensure_streams(ingester, TOPOLOGY, duplicate_window_s=60)  # present: only looked up
    admin = (await login("admin")).nc.jetstream()
    await admin.delete_stream(TOPOLOGY.tx_stream)
    try:
        with pytest.raises(StreamMissing, match=r"stream PFLEA_TX is missing: run `pflea migrate`"):
            await ensure_streams(ingester, TOPOLOGY, duplicate_window_s=60)
    finally:
        await declare_streams(admin, TOPOLOGY, duplicate_window_s=60)


async def test_the_writer_may_consume_and_list_the_partitions_of_pflea_tx_and_no_other_stream(
    ledger: Ledger, login: Any, streams: None, settings: Settings
) -> None:
    admin = (await login("admin")).nc.jetstream()
    await declare_streams(admin, TOPOLOGY, duplicate_window_s=60, shape=StreamSettings(partitions=3))
    try:
        session = await login("writer")
        js = session.nc.jetstream()
        appends = PartitionedAppends(js, TOPOLOGY, Lifecycle(), "", consumer=None)  # type: ignore[arg-type]
        assert await appends.partitions() == 3
        config = writer_consumer_config(TOPOLOGY, 3, 2, ack_wait_s=30)
        sub = await js.pull_subscribe(
            config.filter_subject, durable=config.durable_name, stream=TOPOLOGY.tx_stream, config=config
        )
        await sub.unsubscribe()
        assert await appends.undrained(3) == []  # lists PFLEA_TX's consumers
        assert (await js.consumer_info(TOPOLOGY.tx_stream, "writer-3-2")).config.filter_subject == (
            TOPOLOGY.tx_partition_filter(3, 2)
        )
        subject = f"$JS.API.CONSUMER.CREATE.{TOPOLOGY.events_stream}.writer-3-2"
        await session.nc.publish(subject, b"{}", reply=session.nc.new_inbox())
        await session.nc.flush()
        await session.violation(subject)
    finally:
        await declare_streams(admin, TOPOLOGY, duplicate_window_s=60)


class Slots:
    """A SlotOwner that only records which slots it runs."""

    def __init__(self) -> None:
        self.running: set[int] = set()

    async def slot_started(self, slot: int) -> None:
        self.running.add(slot)

    async def slot_stopped(self, slot: int) -> None:
        self.running.discard(slot)


async def test_the_ingester_leases_slots_in_its_bucket_and_may_not_manage_it_or_touch_another(
    ledger: Ledger, login: Any, streams: None
) -> None:
    session = await login("ingester")
    bucket = ingest_bucket(TOPOLOGY)
    slots = Slots()
    async with Membership(session.nc.jetstream(), bucket, slots, slots=8) as member:
        await wait_until(lambda: slots.running == set(range(8)), 15, "the ingester holding every slot")
        await asyncio.sleep(member.renew_s * 1.5)  # a heartbeat and a renewal of every lease
        assert all(member.holds(slot) for slot in range(8))
    assert slots.running == set()
    assert session.errors.empty(), f"the KV protocol needed more: {session.errors.get_nowait()}"
    kv = await (await login("admin")).nc.jetstream().key_value(bucket)
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("slot.0")  # released on leaving: deleted

    other = f"{TOPOLOGY.namespace.upper()}_OTHER"
    for forbidden in (
        f"$JS.API.STREAM.DELETE.KV_{bucket}",
        f"$JS.API.STREAM.PURGE.KV_{bucket}",
        f"$JS.API.STREAM.UPDATE.KV_{bucket}",
        f"$JS.API.STREAM.CREATE.KV_{other}",
        f"$KV.{other}.slot.0",
        f"$JS.API.DIRECT.GET.KV_{other}.$KV.{other}.slot.0",
        f"$JS.API.CONSUMER.CREATE.{TOPOLOGY.tx_stream}",
    ):
        await session.nc.publish(forbidden, b"{}", reply=session.nc.new_inbox())
        await session.nc.flush()
        await session.violation(forbidden)


async def test_an_ingester_without_its_bucket_names_the_fix(
    ledger: Ledger, login: Any, streams: None
) -> None:
    admin = (await login("admin")).nc.jetstream()
    await admin.delete_stream(f"KV_{ingest_bucket(TOPOLOGY)}")
    try:
        ingester = (await login("ingester")).nc.jetstream()
        with pytest.raises(StreamMissing, match=r"stream KV_PFLEA_INGEST is missing: run `pflea migrate`"):
            await ensure_ingest_bucket(ingester, TOPOLOGY, lease_ttl_s=6)
    finally:
        await declare_ingest_bucket(admin, TOPOLOGY, lease_ttl_s=6)


# --- the CLI ------------------------------------------------------------------------------------


def _pflea(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    env.pop("NATS_URL", None)
    env.pop("DATABASE_URL", None)
    env.update(PFLEA_DATA_DIR=str(data_dir), PFLEA_COMMAND_TIMEOUT_S="5")
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_pflea_agents_add_writes_private_credentials_reloads_and_remove_revokes(
    ledger: Ledger, login: Any, writer: None, settings: Settings
) -> None:
    # What `pflea up` leaves for the CLI: the stack, with the embedded server's pid.
    assert ledger.server.proc is not None
    info = StackInfo(
        settings.database_url, ledger.url("operator"), os.getpid(), nats_pid=ledger.server.proc.pid
    )
    write_stack(ledger.data_dir, info)
    try:
        await _add_use_and_remove(ledger, login)
    finally:
        clear_stack(ledger.data_dir)


async def _add_use_and_remove(ledger: Ledger, login: Any) -> None:
    agent_id = f"c{uuid.uuid4().hex[:8]}"
    added = await asyncio.to_thread(_pflea, ledger.data_dir, "agents", "add", agent_id)
    assert added.returncode == 0, added.stderr
    path = credential_path(ledger.data_dir, agent_id)
    login_ = read_login(path)
    assert str(path) in added.stdout and "reloaded" in added.stdout
    assert login_.nats_password not in added.stdout + added.stderr
    assert login_.nats_user == agent_user(agent_id) and login_.nats_url == ledger.server.url
    for private in (path, registry_path(ledger.data_dir), users_conf_path(ledger.data_dir)):
        assert _mode(private) == 0o600, private
        assert _mode(private.parent) == 0o700, private.parent
    assert login_.nats_password not in registry_path(ledger.data_dir).read_text()
    assert login_.nats_password not in users_conf_path(ledger.data_dir).read_text()

    sent = await asyncio.to_thread(_pflea, ledger.data_dir, "agent", agent_id, "register", "--json")
    assert sent.returncode == 0, sent.stderr
    assert msgspec.json.decode(sent.stdout)["status"] == "accepted"
    listed = await asyncio.to_thread(_pflea, ledger.data_dir, "agents", "list", "--json")
    assert agent_id in [a["agent_id"] for a in msgspec.json.decode(listed.stdout)["agents"]]

    held = await login(login_)
    removed = await asyncio.to_thread(_pflea, ledger.data_dir, "agents", "remove", agent_id)
    assert removed.returncode == 0, removed.stderr
    assert not path.exists()
    await wait_until(lambda: not held.nc.is_connected, 10, "the server dropping the removed agent")
    assert not await _settled(login_)


async def test_pflea_agent_without_credentials_says_how_to_create_them(tmp_path: Path) -> None:
    result = await asyncio.to_thread(_pflea, tmp_path, "agent", "nobody", "faucet")
    assert result.returncode == 1
    assert "no credentials for agent 'nobody'" in result.stderr
    assert "pflea agents add nobody" in result.stderr


async def test_pflea_agent_with_another_agents_credentials_is_refused_by_nats(
    ledger: Ledger, add_agent: Callable[[], Awaitable[AgentLogin]], writer: None
) -> None:
    a, b = await add_agent(), await add_agent()
    # B's credential file, filed under A's name: NATS still knows it is B.
    stolen = credential_path(ledger.data_dir, a.agent_id)
    stolen.write_bytes(credential_path(ledger.data_dir, b.agent_id).read_bytes())
    result = await asyncio.to_thread(_pflea, ledger.data_dir, "agent", a.agent_id, "withdraw", "1", "0xabc")
    assert result.returncode == 1
    assert "NATS refused the command" in result.stderr and "permissions violation" in result.stderr


@pytest.mark.parametrize("user", ["admin", "operator"])
async def test_pflea_migrate_declares_the_streams_as_the_admin_only(
    ledger: Ledger, settings: Settings, tmp_path: Path, user: str
) -> None:
    namespace = f"m{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    env.update(
        DATABASE_URL=role_dsn(settings.database_url, OWNER_ROLE, SERVICE_PASSWORD),
        NATS_URL=ledger.url(user),
        PFLEA_NAMESPACE=namespace,
        PFLEA_DATA_DIR=str(tmp_path),
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "migrate"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    topology = Topology(namespace)
    if user == "operator":
        assert result.returncode == 3
        assert "NATS_URL must name the admin user" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    assert f"streams declared: {topology.tx_stream}, {topology.events_stream}" in result.stdout
    admin = await nats.connect(ledger.url("admin"))
    try:
        kv_stream = f"KV_{ingest_bucket(topology)}"
        assert (
            f"streams declared: {topology.tx_stream}, {topology.events_stream}, {kv_stream}" in result.stdout
        )
        assert (await admin.jetstream().stream_info(kv_stream)).config.max_age == 6.0
        for stream in (topology.tx_stream, topology.events_stream, kv_stream):
            assert (await admin.jetstream().stream_info(stream)).config.name == stream
            await admin.jetstream().delete_stream(stream)
    finally:
        await admin.close()
