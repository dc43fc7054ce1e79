"""A durable pull-consumer loop that survives NATS restarts, shared by writer and projectors.

Messages are pulled continuously (:class:`PullStream`): one pull request is always open on the
server, messages stream into a buffer as they are stored, and the handler takes what has
arrived, up to a batch, while the next batch is already on its way. nats-py's ``fetch`` spends
a task, a uuid4 and a ``wait_for`` on every message and leaves the server idle while a batch is
handled; this costs one callback per message.

A consumer deleted on the server is re-created as soon as the open pull request says so (409
Consumer Deleted), or when nobody answers pull requests any more (503). An idle loop also checks
every ``watchdog_s`` that its consumer still exists (a server restarted without its JetStream
store forgets it without a word) and re-creates it: the watchdog asked for after a NATS restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, Header, StatusCode
from nats.js.errors import NotFoundError

from shared.js_adapter import api_prefix, connection
from shared.ops import Lifecycle

log = logging.getLogger(__name__)

Handler = Callable[[list[Msg]], Awaitable[None]]

_request_encoder = msgspec.json.Encoder()

# Consumer create/info requests on the (re-)subscribe path: short, and retried quickly then
# less often, so a loop is pulling again within a moment of its consumer having a leader.
API_TIMEOUT_S = 1.5
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 0.5


class ConsumerDeleted(Exception):
    """The server ended the pull request because its consumer was deleted (409)."""


class NoResponders(Exception):
    """Nobody serves the consumer's pull requests (503): the consumer, or JetStream, is gone."""


class PullStream:
    """Keep one pull request open on a durable consumer and buffer what it delivers.

    A request asks for ``batch`` messages and lives ``expires_s``; the server sends each message
    as soon as it is stored, a heartbeat every ``heartbeat_s`` while it has none, and a status
    (408 expired, 409 consumer deleted, ...) when the request ends early. A new request goes
    out when the open one is complete and the buffer has room, so at most two batches are in the
    client. With ``max_bytes``, a batch is also bounded in bytes: a request asks for at most that
    many, the buffer has room while it holds less, and :meth:`take` hands out at most that many
    (at least one message), so a consumer of large messages (pages of 200 transactions) holds
    about two requests' worth of bytes, whatever ``batch`` says in messages. A request silent
    for three heartbeats (lost with a reconnect or a server restart) is given up and replaced.
    After a 409 Consumer Deleted or a 503 no request goes out (each would only be refused at
    once, in a busy loop) and :meth:`take` raises until the owner opens a new stream.
    :meth:`finish` stops asking and lets the open request end, so what it delivered can be
    handled before a clean stop.
    """

    def __init__(
        self,
        nc: NATS,
        api_prefix: str,
        stream: str,
        durable: str,
        *,
        batch: int,
        max_bytes: int = 0,
        expires_s: float = 1.0,
        heartbeat_s: float = 0.25,
    ) -> None:
        self.nc = nc
        self.max_bytes = max_bytes  # per request, when messages can be large (0: no limit)
        self.next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.batch = batch
        self.expires_s = expires_s
        self.heartbeat_s = heartbeat_s
        self.buffer: deque[Msg] = deque()
        self.buffered_bytes = 0  # payload bytes in the buffer
        self.arrived = asyncio.Event()
        self.sub: Subscription | None = None
        self.inbox = ""
        self.open = 0  # messages the open request may still deliver; 0 = no request open
        self.heard = 0.0  # when the open request last showed signs of life
        self.closing = False
        self.refused: ConsumerDeleted | NoResponders | None = None  # the server will serve no more

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(self.inbox, cb=self._delivered)
        self.open = 0
        await self._request()

    async def finish(self) -> list[Msg]:
        """Stop asking and wait for the open request to end; what it delivered is returned to
        be handled (a drain: nothing delivered is left to wait out an ack wait)."""
        self.closing = True
        deadline = time.monotonic() + self.expires_s + self.heartbeat_s
        while self.open and self.nc.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        rest = list(self.buffer)
        self.buffer.clear()
        self.buffered_bytes = 0
        return rest

    async def stop(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None

    async def _request(self) -> None:
        if self.open or self.closing or self.refused or self._full():
            return
        request = {
            "batch": self.batch,
            "expires": int(self.expires_s * 1e9),
            "idle_heartbeat": int(self.heartbeat_s * 1e9),
        }
        if self.max_bytes:
            request["max_bytes"] = self.max_bytes
        await self.nc.publish(self.next_subject, _request_encoder.encode(request), reply=self.inbox)
        self.open = self.batch
        self.heard = time.monotonic()

    async def _delivered(self, msg: Msg) -> None:
        self.heard = time.monotonic()
        headers = msg.headers or {}
        status = headers.get(Header.STATUS)
        if status is None:
            self.buffer.append(msg)
            self.buffered_bytes += len(msg.data)
            self.arrived.set()
            self.open = max(self.open - 1, 0)
        elif status == StatusCode.CONTROL_MESSAGE:
            return  # idle heartbeat (or flow control): the request is alive
        else:
            self.open = 0  # the request is over (expired, or the server ended it)
            self._ended(status, headers.get(Header.DESCRIPTION, ""))
        if not self.open:
            try:
                await self._request()
            except Exception as exc:  # disconnected: the next take() asks again
                log.debug("pull request not sent (%r)", exc)

    def _ended(self, status: str, description: str) -> None:
        if status == StatusCode.CONFLICT and description.lower() == "consumer deleted":
            self.refused = ConsumerDeleted(f"{self.next_subject}: 409 {description}")
        elif status == StatusCode.SERVICE_UNAVAILABLE:
            self.refused = NoResponders(f"{self.next_subject}: 503 no responders")
        elif (
            status not in (StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT)
            and "MaxBytes" not in description
        ):
            log.info("pull request ended: %s %s", status, description)
        if self.refused is not None:
            self.arrived.set()  # take() raises it now, not after its timeout

    async def take(self, timeout: float) -> list[Msg]:
        """Up to ``batch`` buffered messages, waiting at most ``timeout`` for the first.

        Raises :class:`ConsumerDeleted` or :class:`NoResponders` once the server has said it
        will serve no more requests; what is buffered stays in :attr:`buffer`."""
        if self.refused is not None:
            raise self.refused
        if self.open and time.monotonic() - self.heard > 3 * self.heartbeat_s:
            log.info("pull request went silent; asking again", extra={"subject": self.next_subject})
            self.open = 0
        await self._request()
        if not self.buffer:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout)
            except TimeoutError:
                return []
            if self.refused is not None:
                raise self.refused
        msgs = self._take_batch()
        await self._request()
        return msgs

    def carry(self, msgs: list[Msg]) -> None:
        """Buffer ``msgs`` delivered to an earlier stream of this consumer, not handled yet."""
        self.buffer.extend(msgs)
        self.buffered_bytes += sum(len(m.data) for m in msgs)

    def _full(self) -> bool:
        return len(self.buffer) >= self.batch or 0 < self.max_bytes <= self.buffered_bytes

    def _take_batch(self) -> list[Msg]:
        """The buffer's first messages: up to ``batch``, and up to ``max_bytes`` of payload
        (at least one, however large)."""
        msgs: list[Msg] = []
        taken = 0
        while self.buffer and len(msgs) < self.batch:
            size = len(self.buffer[0].data)
            if msgs and self.max_bytes and taken + size > self.max_bytes:
                break
            msgs.append(self.buffer.popleft())
            taken += size
        self.buffered_bytes -= taken
        return msgs


class PullLoop:
    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        config: ConsumerConfig,
        lifecycle: Lifecycle,
        *,
        batch: int,
        max_bytes: int = 0,
        watchdog_s: float = 10.0,
    ) -> None:
        self.js = js
        self.stream = stream
        self.config = config
        self.lifecycle = lifecycle
        self.batch = batch
        self.max_bytes = max_bytes
        self.watchdog_s = watchdog_s
        self.pulls: PullStream | None = None
        self.in_hand: list[Msg] = []  # the batch being handled
        self.last_activity = time.monotonic()

    @property
    def durable(self) -> str:
        assert self.config.durable_name is not None
        return self.config.durable_name

    async def subscribe(self) -> None:
        """Create the consumer if it does not exist, and open a pull stream on it."""
        carried: list[Msg] = []
        if self.pulls is not None:
            await self.pulls.stop()
            carried = list(self.pulls.buffer)  # delivered, not handled yet: still ours to handle
        await self._ensure_consumer()
        self.pulls = PullStream(
            connection(self.js),
            api_prefix(self.js),
            self.stream,
            self.durable,
            batch=self.batch,
            max_bytes=self.max_bytes,
        )
        self.pulls.carry(carried)
        await self.pulls.start()

    async def _ensure_consumer(self) -> None:
        """One API request when the consumer exists with this loop's filter, two otherwise.

        Each waits at most :data:`API_TIMEOUT_S`: on a cluster a consumer whose node died answers
        nothing until a new leader is elected (about two seconds), and nats-py's default of five
        seconds would keep this loop idle long after that. A consumer filtering other subjects
        than this loop's (the writer's, before partitions: ``<ns>.tx.>``) is brought in line."""
        try:
            info = await self.js.consumer_info(self.stream, self.durable, timeout=API_TIMEOUT_S)
        except NotFoundError:
            await self.js.add_consumer(self.stream, self.config, timeout=API_TIMEOUT_S)
            return
        if info.config.filter_subject != self.config.filter_subject:
            log.info(
                "consumer filters %s; updating it to %s",
                info.config.filter_subject,
                self.config.filter_subject,
                extra={"consumer": self.durable},
            )
            await self.js.add_consumer(self.stream, self.config, timeout=API_TIMEOUT_S)

    async def run(self, handle: Handler, *, until: asyncio.Event | None = None) -> None:
        """Fetch and hand batches to ``handle`` until stopping (or ``until`` is set); a fetched
        batch is always finished."""
        await self._subscribe_until_ok()
        keeping = asyncio.create_task(self._keep_in_hand_alive())
        try:
            await self._run(handle, until)
        finally:
            keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeping

    async def _run(self, handle: Handler, until: asyncio.Event | None) -> None:
        idle_since = time.monotonic()
        while not self.lifecycle.stopping.is_set() and not (until is not None and until.is_set()):
            assert self.pulls is not None
            try:
                msgs = await self.pulls.take(timeout=1.0)
            except ConsumerDeleted as exc:
                # Nothing to wait for: the server said so. Re-created as the watchdog would.
                log.warning("%s; re-creating the consumer", exc, extra={"consumer": self.durable})
                await self._subscribe_until_ok()
                continue
            except Exception as exc:
                log.warning("pull failed (%r); re-subscribing", exc, extra={"consumer": self.durable})
                if await self.lifecycle.sleep(0.5):
                    break
                await self._subscribe_until_ok()
                continue
            if not msgs:
                if time.monotonic() - idle_since > self.watchdog_s:
                    idle_since = time.monotonic()
                    await self._watchdog()
                continue
            idle_since = self.last_activity = time.monotonic()
            await self._handle(handle, msgs)
        if self.pulls is not None:
            rest = await self.pulls.finish()
            for start in range(0, len(rest), self.batch):
                await self._handle(handle, rest[start : start + self.batch])
            await self.pulls.stop()

    async def _handle(self, handle: Handler, msgs: list[Msg]) -> None:
        self.in_hand = msgs
        try:
            await handle(msgs)
        finally:
            self.in_hand = []

    async def _keep_in_hand_alive(self) -> None:
        """Every third of the ack wait, tell the server that the messages in hand (the batch
        being handled and those buffered behind it) are still being worked on (+WPI).

        Without it a batch slower than the ack wait (a loaded machine, a writer committing one
        message at a time) is handed out again while still in hand; each such redelivery counts
        as an attempt, the writer isolates suspects one at a time, which is slower still, and a
        backlog never drains. A message acked meanwhile ignores the +WPI."""
        ack_wait = float(self.config.ack_wait or 30.0)
        while True:
            await asyncio.sleep(ack_wait / 3)
            buffered = list(self.pulls.buffer) if self.pulls is not None else []
            for msg in [*self.in_hand, *buffered]:
                try:
                    await msg.in_progress()
                except Exception:  # disconnected: the ack wait runs out as it would have
                    break

    async def _watchdog(self) -> None:
        try:
            await self.js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            log.warning("consumer vanished from the server; re-creating", extra={"consumer": self.durable})
            await self._subscribe_until_ok()
        except Exception as exc:
            log.warning("watchdog could not reach JetStream (%r)", exc)

    async def _subscribe_until_ok(self) -> None:
        pause = RETRY_FIRST_S
        while not self.lifecycle.stopping.is_set():
            try:
                await self.subscribe()
                return
            except Exception as exc:
                log.warning("subscribe failed (%r); retrying", exc, extra={"consumer": self.durable})
                if await self.lifecycle.sleep(pause):
                    return
                pause = min(pause * 2, RETRY_MAX_S)

    async def pending(self) -> int | None:
        try:
            info = await self.js.consumer_info(self.stream, self.durable)
        except Exception:
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
