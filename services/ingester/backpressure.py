"""PFLEA_TX has no room: the ingester holds its page, backs off and retries; nothing is skipped.

PFLEA_TX refuses publishes when full (work queue, discard new: see ``shared.jetstream``), which
happens when the writer stores less than is polled, or not at all. A poller then keeps the page
it could not publish, its cursor unmoved, and tries again after a jittered back-off that grows
to ``MAX_WAIT_S``; the writer's acks make room. One incident — from the first refusal until
every waiting poller got its page in — is logged once when it starts and once when it ends,
however many pollers and retries it spans; the counter and the gauge tell the rest.
"""

from __future__ import annotations

import logging
import random
import time

import nats.js.errors
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

MAX_WAIT_S = 10.0

REFUSED = Counter(
    "pflea_ingester_publish_refused_total",
    "Publishes PFLEA_TX refused for want of room (each retried until it is accepted)",
    ["reason"],
)
WAITING = Gauge("pflea_ingester_backpressure_pollers", "Pollers holding a page PFLEA_TX had no room for")

# JSStreamStoreFailedF (10077) carries the store's reason; only these mean "no room" (a message
# over max_msg_size, the other store failure it reports, would never fit).
_STREAM_FULL = frozenset(
    ("maximum messages exceeded", "maximum bytes exceeded", "maximum messages per subject exceeded")
)
# The server's or the account's JetStream storage is exhausted.
_NO_STORAGE = {
    10023: "insufficient resources",
    10002: "resource limits exceeded for account",
    10047: "insufficient storage resources available",
}


def no_room(exc: BaseException) -> str | None:
    """Why JetStream had no room for a publish (the server's words), or None if ``exc`` is
    another failure."""
    if not isinstance(exc, nats.js.errors.APIError):
        return None
    if exc.err_code == 10077 and exc.description in _STREAM_FULL:
        return exc.description
    if exc.err_code in _NO_STORAGE:
        return exc.description or _NO_STORAGE[exc.err_code]
    return None


def wait_s(refusals: int) -> float:
    """The pause after a page's ``refusals``-th refusal in a row: 0.25 s doubling to
    ``MAX_WAIT_S``, jittered so a thousand pollers do not retry in step."""
    return min(0.25 * 2 ** min(refusals - 1, 16), MAX_WAIT_S) * random.uniform(0.5, 1.0)


class Backpressure:
    """The incident, shared by every poller of the process."""

    def __init__(self) -> None:
        self.waiting: set[object] = set()
        self.started: float | None = None
        self.refusals = 0

    def refused(self, poller: object, reason: str, stream: str) -> None:
        REFUSED.labels(reason).inc()
        self.refusals += 1
        if poller not in self.waiting:
            self.waiting.add(poller)
            WAITING.inc()
        if self.started is None:
            self.started = time.monotonic()
            log.warning(
                "%s has no room (%s): pollers hold their pages and retry with back-off up to %ss; "
                "the writer is behind or stopped (logged once per incident; "
                "pflea_ingester_publish_refused_total counts)",
                stream,
                reason,
                MAX_WAIT_S,
                extra={"stream": stream, "reason": reason},
            )

    def accepted(self, poller: object, stream: str) -> None:
        if poller not in self.waiting:
            return
        self.waiting.discard(poller)
        WAITING.dec()
        if not self.waiting and self.started is not None:
            log.warning(
                "%s takes publishes again: %d refused in %.1fs, every held page published",
                stream,
                self.refusals,
                time.monotonic() - self.started,
                extra={"stream": stream, "refusals": self.refusals},
            )
            self.started, self.refusals = None, 0


INCIDENT = Backpressure()  # one per process: its pollers share one log line per incident
