"""Keep every agent's events in the order its transactions reached PFLEA_TX.

A writer killed mid-batch leaves its messages unacked, and JetStream hands them out again only
after the ack wait; by then a restarted writer (or a replica) may have committed newer
transactions of the same agents, and the older ones would land behind them. So the writer never
commits a message while an older PFLEA_TX message may still be uncommitted:

- ``through`` is a watermark: every stream sequence up to it is committed, quarantined, or acked
  by someone (the consumer's ack floor says so);
- a batch that does not start right after the watermark asks the consumer for its ack floor;
  a live holder (a writer replica) acks within a commit, so the floor is watched for up to
  ``hold_s``; whatever still lies between after that (a dead holder's messages wait out the
  ack wait) is read from the stream itself and committed first, in sequence order.

A partition's consumer sees only its own agents' messages, so its sequences have gaps that are
other partitions' (``filter_subject`` is set): there "nothing older is still held" is read off
the consumer instead — every message it delivered and nobody acked is in this batch
(``num_ack_pending``) — and what lies between is found by reading the stream's next message
on the partition's subjects.

Committing a message that another process still holds is safe: event ids are unique in Postgres,
so whoever comes second finds duplicates, and the late redelivery is acked as one. Replicas of
the writer therefore stay correct, but take turns: per-agent order serialises them. Scaling the
appends out means partitioning agents across consumers, not more replicas on one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError
from prometheus_client import Counter

log = logging.getLogger(__name__)

FILLED = Counter(
    "pflea_writer_gap_messages_total",
    "Older PFLEA_TX messages read from the stream ahead of a batch (held by a dead writer)",
)


class SourceOrder:
    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        durable: str,
        *,
        hold_s: float = 2.0,
        filter_subject: str | None = None,
    ) -> None:
        self.js = js
        self.stream = stream
        self.durable = durable
        self.hold_s = hold_s
        self.filter_subject = filter_subject  # None: the consumer sees every stream sequence
        self.last_consumer_seq: int | None = None  # of the last batch, while leading a partition
        self.through = 0
        self.above: set[int] = set()

    def done(self, seqs: Iterable[int]) -> None:
        """These sequences are committed or quarantined: move the watermark over them."""
        self.above.update(s for s in seqs if s > self.through)
        while self.through + 1 in self.above:
            self.through += 1
            self.above.discard(self.through)

    def _raise_floor(self, floor: int) -> None:
        if floor > self.through:
            self.through = floor
            self.above = {s for s in self.above if s > floor}
            self.done(())

    def _gapless(self, seqs: Sequence[int]) -> bool:
        top = max(seqs)
        if top <= self.through:
            return True
        between = top - self.through - 1  # sequences strictly between the watermark and top
        known = {s for s in seqs if self.through < s < top} | {s for s in self.above if s < top}
        return len(known) == between

    def missing(self, seqs: Sequence[int]) -> list[int]:
        have = set(seqs) | self.above
        return [s for s in range(self.through + 1, max(seqs)) if s not in have]

    def leading(self) -> None:
        """A new turn at leading the consumer: what others were handed is not known yet."""
        self.last_consumer_seq = None

    def _all_ours(self, consumer_seqs: Sequence[int]) -> bool:
        """Every delivery since the last batch came to us: the consumer numbers each delivery
        (redeliveries too), so a run continuing the last one means nobody else was handed a
        message meanwhile, and everything older than this batch is done."""
        last = self.last_consumer_seq
        if (
            last is None
            or not consumer_seqs
            or sorted(consumer_seqs) != list(range(last + 1, last + 1 + len(consumer_seqs)))
        ):
            return False
        self.last_consumer_seq = last + len(consumer_seqs)
        return True

    async def older_than(
        self, seqs: Sequence[int], first_deliveries: Sequence[int], consumer_seqs: Sequence[int] = ()
    ) -> list[RawStreamMsg]:
        """The PFLEA_TX messages older than ``seqs`` that may not be committed yet, oldest first.

        ``consumer_seqs`` are the consumer's delivery numbers of the batch (partitions use them).
        ``first_deliveries`` are the batch's sequences delivered for the first time: one at or
        below the watermark means the stream was re-created (NATS lost its store), so the
        watermark starts again from the consumer's ack floor.
        """
        if not seqs:
            return []
        if first_deliveries and min(first_deliveries) <= self.through:
            log.warning("PFLEA_TX sequences went back: the stream was re-created; resetting the watermark")
            self.through, self.above = 0, set()
        if self.filter_subject is None and self._gapless(seqs):
            return []
        if self.filter_subject is not None and self._all_ours(consumer_seqs):
            return []
        deadline = time.monotonic() + self.hold_s
        while True:
            info = await self.js.consumer_info(self.stream, self.durable)
            self._raise_floor(int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0)
            if self.filter_subject is None and self._gapless(seqs):
                break
            if self.filter_subject is not None and int(info.num_ack_pending or 0) <= len(seqs):
                self.last_consumer_seq = max(consumer_seqs, default=None)
                return []  # nobody else holds anything: whatever is older is acked
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)  # a live holder is committing: let it finish
        if self.filter_subject is None:
            older = await self._read_missing(seqs)
        else:
            older = await self._scan(seqs)
            self.last_consumer_seq = max(consumer_seqs, default=None)
        if older:
            FILLED.inc(len(older))
            log.info(
                "committing %d older messages held elsewhere first",
                len(older),
                extra={"from_seq": older[0].seq, "to_seq": older[-1].seq},
            )
        return older

    async def _read_missing(self, seqs: Sequence[int]) -> list[RawStreamMsg]:
        older: list[RawStreamMsg] = []
        for seq in self.missing(seqs):
            try:
                older.append(await self.js.get_msg(self.stream, seq))
            except NotFoundError:
                self.done((seq,))  # deleted or aged out of the stream: nothing to keep in order
        return older

    async def _scan(self, seqs: Sequence[int]) -> list[RawStreamMsg]:
        """The partition's messages between the watermark and the batch not known done, read
        one by one as the stream's next message on the partition's subjects."""
        have = set(seqs) | self.above
        older: list[RawStreamMsg] = []
        seq, top = self.through + 1, max(seqs)
        while seq < top:
            try:
                raw = await self.js.get_msg(self.stream, seq, next=True, subject=self.filter_subject)
            except NotFoundError:
                break  # nothing more on these subjects
            if raw.seq is None or raw.seq >= top:
                break
            if raw.seq not in have:
                older.append(raw)
            seq = raw.seq + 1
        return older
