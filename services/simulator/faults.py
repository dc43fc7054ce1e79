"""Which transient fault, if any, a request gets: decided by a seeded RNG so runs replay.

Every decision draws the same number of values whatever the knobs say, so the sequence of
decisions for the n-th request depends only on the seed and the knobs in force for it.
"""

from __future__ import annotations

import random

import msgspec

from .config import FaultKnobs
from .feed import MAX_OVERLAP

SERVER_ERROR_STATUSES = (500, 502, 503, 504)


class FaultDecision(msgspec.Struct, frozen=True):
    """At most one of throttle / server_error; a hang may come with a repeated page."""

    throttle: bool = False
    server_error: int | None = None
    hang_s: float = 0.0
    overlap: int = 0

    @property
    def fails(self) -> bool:
        return self.throttle or self.server_error is not None


NO_FAULT = FaultDecision()


class FaultInjector:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"{seed}:faults")

    def decide(self, knobs: FaultKnobs) -> FaultDecision:
        rng = self._rng
        throttle, error, hang, repeat = rng.random(), rng.random(), rng.random(), rng.random()
        status = rng.choice(SERVER_ERROR_STATUSES)
        overlap = rng.randint(1, MAX_OVERLAP)
        if throttle < knobs.too_many_requests_rate:
            return FaultDecision(throttle=True)
        if error < knobs.server_error_rate:
            return FaultDecision(server_error=status)
        return FaultDecision(
            hang_s=knobs.hang_s if hang < knobs.hang_rate else 0.0,
            overlap=overlap if repeat < knobs.repeat_page_rate else 0,
        )
