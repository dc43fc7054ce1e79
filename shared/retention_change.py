"""Change a stream's retention, which nats-server refuses to do in place (to or from work queue).

PFLEA_TX became a work queue (a message lives until the writer has stored it); a deployment
from before has a limits stream. The only way is to delete it and create it again, and the
messages it holds go with it. That is safe only for messages the writer has stored: a stored
transaction is in Postgres, but the ingester re-reads its cursor from Postgres only after a NATS
reconnect or a restart, so a message deleted before it was stored would be lost. Hence:

1. **fence**: the stream is updated to refuse every new publish (discard new, its current size
   as its limit, nothing expiring); the ingester backs off and retries, as at any full stream;
2. **drain**: wait until every consumer on it has nothing pending and nothing unacknowledged
   (the writer acks after its commit), while it makes progress;
3. drained: **re-create** it with the new config; the writer's pull loop re-creates its
   consumer, and the ingester's retried publishes land in the new stream;
4. not drained (the writer is not running, or a stale consumer holds messages): leave it a
   limits stream that drops nothing (discard new, no max age, the new size limits) and say so;
   a later ``pflea migrate`` / ``pflea up``, once the writer has caught up, converts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig, StreamInfo

log = logging.getLogger(__name__)

POLL_S = 0.2


async def change_retention(
    js: JetStreamContext, info: StreamInfo, config: StreamConfig, *, drain_wait_s: float
) -> str | None:
    """Re-create the stream ``info`` describes with ``config`` once nothing in it is unstored;
    None when done, else a sentence saying why not and what to do."""
    name = config.name
    assert name is not None and info.config.name == name
    fence = dataclasses.replace(
        info.config,
        discard=DiscardPolicy.NEW,
        max_age=0,
        max_msgs=-1,
        max_bytes=max(int(info.state.bytes), 1),
    )
    await js.update_stream(fence)
    log.info("stream %s fenced (refuses publishes) to change its retention", name)
    undrained = await _wait_drained(js, name, drain_wait_s)
    if not undrained:
        await js.delete_stream(name)
        await js.add_stream(config)
        log.warning(
            "stream %s re-created with %s retention (it held only stored messages)", name, _retention(config)
        )
        return None
    interim = dataclasses.replace(
        info.config,
        discard=DiscardPolicy.NEW,
        max_age=0,
        max_msgs=config.max_msgs,
        max_bytes=config.max_bytes,
    )
    await js.update_stream(interim)
    held = ", ".join(f"{consumer}: {what}" for consumer, what in sorted(undrained.items()))
    note = (
        f"stream {name} keeps {_retention(info.config)} retention for now: it holds messages not yet "
        f"stored ({held}); it drops nothing meanwhile (discard new, no max age). Let the writer catch "
        f"up (`pflea status`: its pending at 0) and run `pflea migrate` (or `pflea up`) again to make "
        f"it a {_retention(config)} stream"
    )
    log.warning(note)
    return note


async def _wait_drained(js: JetStreamContext, stream: str, wait_s: float) -> dict[str, str]:
    """Wait while the stream's consumers make progress, up to ``wait_s``; what each still holds."""
    deadline = time.monotonic() + wait_s
    stalled_at = time.monotonic() + min(5.0, wait_s)
    last: dict[str, str] | None = None
    while True:
        undrained = await _undrained(js, stream)
        now = time.monotonic()
        if not undrained or now >= deadline or (undrained == last and now >= stalled_at):
            return undrained
        if undrained != last:
            last, stalled_at = undrained, now + min(5.0, wait_s)
        await asyncio.sleep(POLL_S)


async def _undrained(js: JetStreamContext, stream: str) -> dict[str, str]:
    info = await js.stream_info(stream)
    consumers = await js.consumers_info(stream)
    if not consumers:
        messages = int(info.state.messages or 0)
        return {"no consumer": f"{messages} messages never read"} if messages else {}
    return {
        c.name: f"{c.num_pending} pending, {c.num_ack_pending} unacknowledged"
        for c in consumers
        if c.num_pending or c.num_ack_pending
    }


def _retention(config: StreamConfig) -> str:
    return RetentionPolicy(config.retention or RetentionPolicy.LIMITS).value
