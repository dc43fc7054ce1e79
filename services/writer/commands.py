"""The writer's command handler: NATS request/reply on ``<ns>.cmd.<agent>.<Command>``.

Every writer subscribes in one queue group, so each command reaches one of them. Per command:

1. A reply already stored for its ``command_id`` is the answer (a retry never applies twice).
2. Load the agent's state (newest snapshot + the events after it) and :func:`decide`.
3. Rejected: store the rejection, answer it. Accepted: append with the version decided against
   and store the reply in the same transaction; if another writer moved the stream meanwhile
   (``OptimisticConcurrencyError``), reload and decide again.

With a Purple Flea API and a key for the agent, PlaceBet and ClaimFaucet are sent there after
the local checks, and what Purple Flea did is recorded under the event ids the ingester derives
for those transactions, so its later poll finds them stored. Without one, a PlaceBet records
only BetPlaced: the outcome is not known to the ledger.

Before any of that, the sender: agents reach ``<ns>.cmd.>`` only through the AGENTS account's
service import, which stamps each command with its authenticated account and user
(``Nats-Request-Info``), and no user of the ledger's own account may publish there, so the header
cannot be forged. A command whose sender is not ``agent-<the subject's agent>`` of AGENTS, or that
has no header, is answered ``forbidden`` and nothing is read or written for it
(``PFLEA_COMMAND_AUTH=off`` drops the check for a NATS server without accounts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import msgspec
from msgspec.structs import replace
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram

from services.writer.decide import FAUCET_ASSET, Accept, Rejection, checked_shape, decide
from services.writer.purpleflea import (
    BadAnswer,
    OutcomeUnknown,
    PurpleFleaCommands,
    UpstreamRejected,
    UpstreamUnavailable,
)
from shared.commands import (
    ClaimFaucet,
    Code,
    Command,
    PlaceBet,
    RegisterAgent,
    Reply,
    command_event_id,
)
from shared.db import TRANSIENT_DB_ERRORS
from shared.envelope import FAUCET_FEED, bet_event_id, ingested_event_id
from shared.events import BetPlaced, BetWon, Event, FaucetClaimed
from shared.history import current_state
from shared.jetstream import NATS_ERRORS, Topology
from shared.money import parse_amount
from shared.nats_auth import AGENTS_ACCOUNT, REQUEST_INFO_HEADER, agent_user
from shared.ops import Lifecycle
from shared.settings import AGENT_ID_PATTERN, CASINO_FEED, Settings
from shared.store import EventStore, NewEvent, OptimisticConcurrencyError, StreamEvent
from shared.wire import decode_command, decode_reply, encode_reply, request_sender

log = logging.getLogger(__name__)

QUEUE_GROUP = "pflea-writer-commands"
# metadata.origin: "local" = decided by this ledger alone (no Purple Flea API answered for it),
# "purpleflea" = what Purple Flea answered it did.
ORIGIN_LOCAL = "local"
ORIGIN_PURPLEFLEA = "purpleflea"
STREAM_TYPE = "agent"
MAX_ATTEMPTS = 25

COMMANDS = Counter("pflea_writer_commands_total", "Commands answered", ["command", "status"])
CONFLICTS = Counter(
    "pflea_writer_command_conflicts_total", "Command appends that lost a race and were decided again"
)
COMMAND_SECONDS = Histogram(
    "pflea_writer_command_processing_seconds",
    "Time from receiving a command to having its answer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class _IdOnly(msgspec.Struct):
    command_id: uuid.UUID | None = None


class _Answered(Exception):
    """Another handler stored a reply for this command id first: that one is the answer."""


class AgentLocks:
    """One asyncio lock per agent with commands in flight, dropped when none are."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, agent_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(agent_id, (asyncio.Lock(), 0))
        self._locks[agent_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[agent_id]
            if users == 1:
                del self._locks[agent_id]
            else:
                self._locks[agent_id] = (lock, users - 1)


def _reply(
    agent_id: str,
    command: Command,
    status: str,
    code: str | None = None,
    reason: str | None = None,
    **kw: Any,
) -> Reply:
    return Reply(
        command_id=command.command_id,
        agent_id=agent_id,
        command=type(command).__name__,
        status=status,  # type: ignore[arg-type]
        code=code,
        reason=reason,
        **kw,
    )


class CommandHandler:
    def __init__(
        self,
        nc: Client,
        store: EventStore,
        topology: Topology,
        settings: Settings,
        lifecycle: Lifecycle,
        purpleflea: PurpleFleaCommands | None = None,
    ) -> None:
        self.nc = nc
        self.store = store
        self.pool: asyncpg.Pool = store.pool
        self.topology = topology
        self.lifecycle = lifecycle
        self.purpleflea = purpleflea
        self.faucet_amount = parse_amount(settings.faucet_amount, "PFLEA_FAUCET_AMOUNT")
        self.faucet_claims, self.faucet_window_s = settings.faucet_claims, settings.faucet_window_s
        self.command_auth = settings.command_auth
        self._gate = asyncio.Semaphore(settings.command_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks = AgentLocks()

    async def run(self) -> None:
        """Answer commands until stopping; then stop taking new ones and finish those in flight."""
        sub = await self.nc.subscribe(self.topology.command_filter, queue=QUEUE_GROUP, cb=self._received)
        log.info("answering commands", extra={"subject": self.topology.command_filter})
        try:
            await self.lifecycle.stopping.wait()
        finally:
            with contextlib.suppress(*NATS_ERRORS):
                await sub.unsubscribe()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _received(self, msg: Msg) -> None:
        # Waiting here holds back the subscription: at most command_concurrency in flight.
        await self._gate.acquire()
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._gate.release()

    async def _serve(self, msg: Msg) -> None:
        started = time.perf_counter()
        reply = await self.handle(msg.subject, msg.data, msg.headers)
        COMMAND_SECONDS.observe(time.perf_counter() - started)
        COMMANDS.labels(reply.command, reply.status).inc()
        if msg.reply:
            try:
                await msg.respond(encode_reply(reply))
            except NATS_ERRORS as exc:  # the client retries with the same command id
                log.warning("could not answer a command: %r", exc)

    async def handle(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> Reply:
        """The answer to one command message (never raises)."""
        prefix = f"{self.topology.namespace}.cmd."
        agent_id, _, name = subject.removeprefix(prefix).partition(".")
        if self.command_auth and (reason := _forbidden(agent_id, headers)):
            log.warning("command refused: %s", reason, extra={"agent": agent_id, "command": name})
            return _unanswerable(agent_id, name, data, Code.FORBIDDEN, reason)
        try:
            command = decode_command(data)
        except msgspec.DecodeError as exc:
            return _unanswerable(agent_id, name, data, Code.BAD_COMMAND, f"command: {exc}")
        if type(command).__name__ != name or not AGENT_ID_PATTERN.fullmatch(agent_id):
            reason = f"subject {subject!r} does not match a {type(command).__name__}"
            return _unanswerable(agent_id, name, data, Code.BAD_COMMAND, reason)
        try:
            async with self._locks.hold(agent_id):
                return await self._answer(agent_id, command)
        except TRANSIENT_DB_ERRORS as exc:
            reason = f"the database is unavailable ({type(exc).__name__}); send the same command again"
            return _reply(agent_id, command, "failed", Code.UNAVAILABLE, reason)
        except Exception:
            log.exception("command failed", extra={"agent": agent_id, "command": name})
            return _reply(agent_id, command, "failed", Code.INTERNAL, "internal error; see the writer's log")

    async def _answer(self, agent_id: str, command: Command) -> Reply:
        stored = await self._stored(agent_id, command)
        if stored is not None:
            return stored
        key = None
        if self.purpleflea is not None and not isinstance(command, RegisterAgent):
            key = await self.purpleflea.key_for(agent_id)
        if key is not None and not isinstance(command, PlaceBet | ClaimFaucet):
            reason = (
                f"{agent_id} is linked to Purple Flea, which has no endpoint for {type(command).__name__}: "
                "do it on Purple Flea and its feed will record it"
            )
            return await self._reject(agent_id, command, Code.NOT_ON_PURPLEFLEA, reason)
        if key is not None and await self._sent_before(command):
            # Purple Flea may have applied it already: it alone judges funds now.
            shape = checked_shape(command, faucet_amount=self.faucet_amount)
            if isinstance(shape, Rejection):
                return await self._reject(agent_id, command, shape.code, shape.reason)
            return await self._through_purpleflea(agent_id, command, key, shape)
        for attempt in range(MAX_ATTEMPTS):
            async with self.pool.acquire() as conn:
                state, version = await current_state(conn, agent_id)
                faucet = key is None and isinstance(command, ClaimFaucet) and state.registered
                if faucet and (limited := await self._faucet_limit(conn, agent_id)) is not None:
                    return await self._reject(agent_id, command, Code.RATE_LIMITED, limited)
            decision = decide(state, command, faucet_amount=self.faucet_amount)
            if isinstance(decision, Rejection):
                return await self._reject(agent_id, command, decision.code, decision.reason)
            if key is not None:
                return await self._through_purpleflea(agent_id, command, key, decision)
            events = [
                NewEvent.of(
                    event,
                    event_id=command_event_id(command.command_id, i),
                    causation_id=str(command.command_id),
                    metadata=_command_metadata(command, ORIGIN_LOCAL),
                )
                for i, event in enumerate(decision.events)
            ]
            try:
                return await self._commit(agent_id, command, events, expected_version=version)
            except OptimisticConcurrencyError:
                CONFLICTS.inc()
                # Another writer appended to this agent: a little jitter keeps two losers apart.
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        reason = f"the stream kept moving for {MAX_ATTEMPTS} attempts; send the same command again"
        return _reply(agent_id, command, "failed", Code.CONFLICT, reason)

    async def _faucet_limit(self, conn: asyncpg.Connection, agent_id: str) -> str | None:
        """Why a local faucet claim is refused now, or None: at most PFLEA_FAUCET_CLAIMS accepted
        claims per PFLEA_FAUCET_WINDOW_S. Read in every attempt: a claim another writer committed
        meanwhile moved the stream, so this attempt's append fails and the next one counts it."""
        window = self.faucet_window_s
        recent = await conn.fetch(
            """SELECT recorded_at FROM command_results
               WHERE agent_id = $1 AND command_type = 'ClaimFaucet' AND accepted
                 AND recorded_at > clock_timestamp() - make_interval(secs => $2)
               ORDER BY recorded_at""",
            agent_id,
            window,
        )
        if len(recent) < self.faucet_claims:
            return None
        next_at = recent[-self.faucet_claims]["recorded_at"] + timedelta(seconds=window)
        return (
            f"the faucet gives {self.faucet_claims} claim(s) per {window:g} s; "
            f"the next one from {next_at.isoformat(timespec='seconds')}"
        )

    async def _through_purpleflea(self, agent_id: str, command: Command, key: str, decision: Accept) -> Reply:
        assert self.purpleflea is not None
        await self.pool.execute(
            """INSERT INTO command_attempts (command_id, agent_id, command_type) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING""",
            command.command_id,
            agent_id,
            type(command).__name__,
        )
        try:
            if isinstance(command, PlaceBet):
                bet = decision.events[0]
                assert isinstance(bet, BetPlaced)
                return await self._bet(agent_id, command, key, bet)
            assert isinstance(command, ClaimFaucet)
            return await self._claim(agent_id, command, key)
        except UpstreamRejected as exc:
            if exc.status in (401, 403):  # our key is wrong: not the command's fault, do not store
                return _reply(agent_id, command, "failed", Code.UPSTREAM_REJECTED, str(exc))
            code = Code.INSUFFICIENT_FUNDS if exc.status == 409 else Code.UPSTREAM_REJECTED
            return await self._reject(agent_id, command, code, f"Purple Flea: {exc.detail}")
        except UpstreamUnavailable as exc:
            reason = (
                f"Purple Flea could not be reached ({exc}); nothing happened, send the same command again"
            )
            return _reply(agent_id, command, "failed", Code.UPSTREAM_UNAVAILABLE, reason)
        except OutcomeUnknown as exc:
            reason = (
                f"Purple Flea did not answer ({exc}): it may have applied this command, and its feed "
                "will record it if so; sending it again may apply it twice"
            )
            return _reply(agent_id, command, "failed", Code.OUTCOME_UNKNOWN, reason)
        except BadAnswer as exc:
            log.error("Purple Flea answered something undocumented: %s", exc, extra={"agent": agent_id})
            reason = f"Purple Flea's answer is unusable ({exc}); nothing was recorded"
            return _reply(agent_id, command, "failed", Code.UPSTREAM_BAD_ANSWER, reason)

    async def _bet(self, agent_id: str, command: PlaceBet, key: str, bet: BetPlaced) -> Reply:
        assert self.purpleflea is not None and bet.game is not None
        if bet.asset != FAUCET_ASSET:
            reason = f"asset: Purple Flea's casino takes bets in {FAUCET_ASSET} only, not {bet.asset}"
            return await self._reject(agent_id, command, Code.BAD_COMMAND, reason)
        answer = await self.purpleflea.place_bet(agent_id, key, bet.game, bet.amount, str(command.command_id))
        won, payout = answer.checked()
        facts: list[tuple[uuid.UUID, Event]] = [
            (bet_event_id(agent_id, answer.bet_id, won=False), replace(bet, bet_id=answer.bet_id))
        ]
        if won:
            win = BetWon(amount=payout, asset=bet.asset, game=bet.game, bet_id=answer.bet_id)
            facts.append((bet_event_id(agent_id, answer.bet_id, won=True), win))
        extra = {"bet_id": answer.bet_id, "won": won, "payout": payout}
        return await self._record(agent_id, command, CASINO_FEED, facts, **extra)

    async def _claim(self, agent_id: str, command: ClaimFaucet, key: str) -> Reply:
        assert self.purpleflea is not None
        answer = await self.purpleflea.claim_faucet(agent_id, key, str(command.command_id))
        if not answer.success:
            reason = f"Purple Flea's faucet refused the claim: {answer.error or 'success: false'}"
            return await self._reject(agent_id, command, Code.UPSTREAM_REJECTED, reason)
        amount, tx_id = answer.checked()
        claimed = FaucetClaimed(amount=amount, asset=FAUCET_ASSET, tx_id=tx_id)
        facts: list[tuple[uuid.UUID, Event]] = [(ingested_event_id(FAUCET_FEED, agent_id, tx_id), claimed)]
        return await self._record(agent_id, command, FAUCET_FEED, facts, tx_ids=(tx_id,))

    async def _record(
        self, agent_id: str, command: Command, feed: str, facts: list[tuple[uuid.UUID, Event]], **extra: Any
    ) -> Reply:
        """Store what Purple Flea did under the ids its feed's report of it gets (see
        shared.envelope), so the later poll finds it stored; a fact now, never re-decided."""
        metadata = {**_command_metadata(command, ORIGIN_PURPLEFLEA), "feed": feed}
        events = [
            NewEvent.of(event, event_id=event_id, causation_id=str(command.command_id), metadata=metadata)
            for event_id, event in facts
        ]
        return await self._commit(agent_id, command, events, expected_version=None, **extra)

    async def _commit(
        self,
        agent_id: str,
        command: Command,
        events: list[NewEvent],
        *,
        expected_version: int | None,
        **extra: Any,
    ) -> Reply:
        ids = [e.event_id for e in events]
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if expected_version is None:
                    # The ingester may have stored some of these transactions already: skip them.
                    result = await self.store.append_batch(
                        [StreamEvent(agent_id, STREAM_TYPE, e) for e in events], conn=conn
                    )
                    if result.collisions:  # an id of another agent's: refuse, never skip
                        taken = {c.item.event.event_id: c.stored_in for c in result.collisions}
                        raise RuntimeError(f"event ids stored in other streams: {taken}")
                else:
                    await self.store.append(agent_id, STREAM_TYPE, events, expected_version, conn=conn)
                version = await conn.fetchval(
                    "SELECT max(version) FROM events WHERE event_id = ANY($1::uuid[])", ids
                )
                reply = _reply(
                    agent_id, command, "accepted", version=int(version), event_ids=tuple(ids), **extra
                )
                if not await self._insert_result(conn, reply, version=int(version)):
                    raise _Answered
        except _Answered:
            stored = await self._stored(agent_id, command)
            assert stored is not None
            return stored
        return reply

    async def _reject(self, agent_id: str, command: Command, code: str, reason: str) -> Reply:
        reply = _reply(agent_id, command, "rejected", code, reason)
        async with self.pool.acquire() as conn:
            if await self._insert_result(conn, reply, version=None):
                return reply
        stored = await self._stored(agent_id, command)
        assert stored is not None
        return stored

    async def _insert_result(self, conn: asyncpg.Connection, reply: Reply, *, version: int | None) -> bool:
        inserted = await conn.fetchval(
            """INSERT INTO command_results (command_id, agent_id, command_type, accepted, version, reply)
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (command_id) DO NOTHING RETURNING true""",
            reply.command_id,
            reply.agent_id,
            reply.command,
            reply.accepted,
            version,
            encode_reply(reply),
        )
        return bool(inserted)

    async def _sent_before(self, command: Command) -> bool:
        return bool(
            await self.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM command_attempts WHERE command_id = $1)", command.command_id
            )
        )

    async def _stored(self, agent_id: str, command: Command) -> Reply | None:
        data = await self.pool.fetchval(
            "SELECT reply FROM command_results WHERE command_id = $1", command.command_id
        )
        if data is None:
            return None
        reply = decode_reply(data)
        if reply.agent_id != agent_id or reply.command != type(command).__name__:
            reason = (
                f"command_id {command.command_id} was used for {reply.command} of {reply.agent_id}; "
                "a new command needs a new command_id"
            )
            return _reply(agent_id, command, "rejected", Code.BAD_COMMAND, reason)
        return reply


def _command_metadata(command: Command, origin: str) -> dict[str, str]:
    return {"command": type(command).__name__, "command_id": str(command.command_id), "origin": origin}


def _forbidden(agent_id: str, headers: dict[str, str] | None) -> str | None:
    """Why the sender may not command ``agent_id``, or None when it is that agent."""
    sender = request_sender(headers)
    if sender is None:
        return (
            f"the command carries no {REQUEST_INFO_HEADER}: it did not come through the "
            f"{AGENTS_ACCOUNT} account; send it with the agent's own credentials"
        )
    if sender.acc != AGENTS_ACCOUNT or sender.user != agent_user(agent_id):
        who = f"{sender.user or 'an unknown user'} of account {sender.acc or '?'}"
        return f"{who} may not send commands for {agent_id}"
    return None


def _unanswerable(agent_id: str, name: str, data: bytes, code: str, reason: str) -> Reply:
    """A rejection of a message that is not a valid command, or not this sender's to send
    (nothing is read or stored for it)."""
    try:
        command_id = msgspec.json.decode(data, type=_IdOnly).command_id
    except msgspec.DecodeError:
        command_id = None
    return Reply(
        command_id=command_id or uuid.UUID(int=0),
        agent_id=agent_id,
        command=name,
        status="rejected",
        code=code,
        reason=reason,
    )
