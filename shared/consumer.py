"""A durable pull-consumer loop that survives NATS restarts, shared by writer and projectors.

``fetch`` errors re-create the subscription; an idle loop also checks every ``watchdog_s``
that its consumer still exists on the server (a server restarted without its JetStream store
forgets it) and re-creates it: the watchdog asked for after a NATS restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

from shared.ops import Lifecycle

log = logging.getLogger(__name__)

Handler = Callable[[list[Msg]], Awaitable[None]]


class PullLoop:
    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        config: ConsumerConfig,
        lifecycle: Lifecycle,
        *,
        batch: int,
        watchdog_s: float = 10.0,
    ) -> None:
        self.js = js
        self.stream = stream
        self.config = config
        self.lifecycle = lifecycle
        self.batch = batch
        self.watchdog_s = watchdog_s
        self.sub: JetStreamContext.PullSubscription | None = None
        self.last_activity = time.monotonic()

    @property
    def durable(self) -> str:
        assert self.config.durable_name is not None
        return self.config.durable_name

    async def subscribe(self) -> None:
        if self.sub is not None:
            try:
                await self.sub.unsubscribe()
            except Exception:
                pass
        assert self.config.filter_subject is not None
        self.sub = await self.js.pull_subscribe(
            self.config.filter_subject, durable=self.durable, stream=self.stream, config=self.config
        )

    async def run(self, handle: Handler) -> None:
        """Fetch and hand batches to ``handle`` until stopping; a fetched batch is always finished."""
        await self._subscribe_until_ok()
        idle_since = time.monotonic()
        while not self.lifecycle.stopping.is_set():
            assert self.sub is not None
            try:
                msgs = await self.sub.fetch(self.batch, timeout=1.0)
            except NatsTimeout:
                if time.monotonic() - idle_since > self.watchdog_s:
                    idle_since = time.monotonic()
                    await self._watchdog()
                continue
            except Exception as exc:
                log.warning("fetch failed (%r); re-subscribing", exc, extra={"consumer": self.durable})
                if await self.lifecycle.sleep(0.5):
                    break
                await self._subscribe_until_ok()
                continue
            idle_since = self.last_activity = time.monotonic()
            await handle(msgs)
        if self.sub is not None:
            try:
                await self.sub.unsubscribe()
            except Exception:
                pass

    async def _watchdog(self) -> None:
        try:
            await self.js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            log.warning("consumer vanished from the server; re-creating", extra={"consumer": self.durable})
            await self._subscribe_until_ok()
        except Exception as exc:
            log.warning("watchdog could not reach JetStream (%r)", exc)

    async def _subscribe_until_ok(self) -> None:
        while not self.lifecycle.stopping.is_set():
            try:
                await self.subscribe()
                return
            except Exception as exc:
                log.warning("subscribe failed (%r); retrying", exc, extra={"consumer": self.durable})
                if await self.lifecycle.sleep(1.0):
                    return

    async def pending(self) -> int | None:
        try:
            info = await self.js.consumer_info(self.stream, self.durable)
        except Exception:
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
