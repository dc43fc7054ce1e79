"""What a run reports: how far it is from converged, and its verdict with the figures."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from tests.chaos.checker import Findings
from tests.chaos.schedule import Schedule


@dataclass
class Progress:
    """How far the system is from the truth; ``done`` when nothing is left to do."""

    expected: int = 0
    expected_quarantined: int = 0
    quarantined: int = 0
    head: int = 0
    relayed: int = -1
    lag: int = -1
    pending: dict[str, int | None] = field(default_factory=dict)
    stored: int | None = None  # these two cost a scan: read only once the rest is quiet
    behind: int | None = None

    @property
    def quiet(self) -> bool:
        return (
            self.quarantined >= self.expected_quarantined
            and self.relayed == self.head
            and self.lag == 0
            and bool(self.pending)
            and all(n == 0 for n in self.pending.values())
        )

    @property
    def done(self) -> bool:
        return self.quiet and self.stored is not None and self.stored >= self.expected and self.behind == 0


@dataclass
class Verdict:
    schedule: Schedule
    findings: Findings
    recovery_s: float | None
    problems: list[str]
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.findings.problems

    def line(self) -> str:
        f = self.findings
        recovery = "never" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        notes = "".join(f" {k}={v}" for k, v in self.notes.items())
        return (
            f"chaos {self.schedule.scenario} seed={self.schedule.seed}: missing={f.missing} "
            f"duplicates={f.duplicates} extra={f.extra} recovery={recovery} reordered={f.reordered}{notes}"
        )

    def explain(self) -> str:
        return "\n".join([self.line(), *self.problems, *self.findings.problems, str(self.schedule)])

    def record(self) -> None:
        """Print the figures; append them to ``$PFLEA_CHAOS_REPORT`` (JSON lines) if set."""
        print(self.line())
        if path := os.environ.get("PFLEA_CHAOS_REPORT"):
            entry = {
                "scenario": self.schedule.scenario,
                "seed": self.schedule.seed,
                "missing": self.findings.missing,
                "duplicates": self.findings.duplicates,
                "extra": self.findings.extra,
                "recovery_s": self.recovery_s,
                "reordered": self.findings.reordered,
                "ok": self.ok,
                **{k: v for k, v in self.notes.items() if isinstance(v, int | float | str)},
            }
            with open(path, "a") as out:
                out.write(json.dumps(entry) + "\n")
