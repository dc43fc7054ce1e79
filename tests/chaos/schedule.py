"""A fault schedule: what the harness does, and when, derived from a seed so a run replays.

A schedule is plain data, printed on failure with the command that replays it. The steps are
performed in order by :meth:`tests.chaos.harness.ChaosRun.perform`; ``at_s`` counts from the
moment the faults begin, and a step that waits (``await-exit``, ``await-ready``) delays the ones
after it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

DEFAULT_SEEDS = (1, 2, 3)


def chaos_seeds(*, heavy: bool = False) -> list[int]:
    """``PFLEA_CHAOS_SEEDS=1,2,3`` (the default) or any other list, e.g. ``$(seq -s, 1 20)``.

    A ``heavy`` scenario (a minute or more per seed) runs the first default seed only, unless
    the seeds are chosen explicitly: the default suite must fit in CI's time.
    """
    raw = os.environ.get("PFLEA_CHAOS_SEEDS", "")
    if not raw.strip():
        return list(DEFAULT_SEEDS[:1] if heavy else DEFAULT_SEEDS)
    try:
        return [int(part) for part in raw.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"PFLEA_CHAOS_SEEDS: expected comma-separated integers, got {raw!r}") from None


def rng_for(scenario: str, seed: int) -> random.Random:
    """Each scenario draws from its own stream, so adding a scenario never changes another's."""
    return random.Random(f"chaos:{scenario}:{seed}")


@dataclass(frozen=True)
class Step:
    at_s: float
    action: str
    target: str = ""
    arg: str = ""

    def __str__(self) -> str:
        return f"+{self.at_s:6.2f}s  {self.action:<14} {self.target:<20} {self.arg}".rstrip()


@dataclass
class Schedule:
    scenario: str
    seed: int
    test: str
    steps: list[Step] = field(default_factory=list)

    def add(self, at_s: float, action: str, target: str = "", arg: str = "") -> float:
        self.steps.append(Step(round(at_s, 3), action, target, arg))
        return at_s

    @property
    def replay(self) -> str:
        return f"PFLEA_CHAOS_SEEDS={self.seed} .venv/bin/python -m pytest '{self.test}' -q"

    def __str__(self) -> str:
        lines = [f"chaos scenario {self.scenario!r}, seed {self.seed}; replay with:", f"  {self.replay}"]
        lines += [f"  {step}" for step in self.steps] or ["  (no timed faults)"]
        return "\n".join(lines)
