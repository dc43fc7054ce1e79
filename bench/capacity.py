"""A capacity model from figures measured in this run: events/s for a number of machines, and
what stops it first.

Inputs (all from the same run):

- CPU µs per event of every process, from the end-to-end scenario (its ``cpu_s`` over its
  events): the services scale out (ingesters by agents, writers by partitions, projectors by
  replicas, the relay is one leader), nats-server by nodes, Postgres not at all (one primary);
- the global-order lock: every append of every partition commits under it, so appends cannot
  go faster than one batch per time it is held. The writer scenario drains PFLEA_TX with one
  writer, so its events/s *is* that ceiling (P=3 does not raise it: see the partitions figures);
- replicas: with R3 every message is stored by three nodes, so nats-server's CPU per event is
  counted three times.

Machines are ``cores`` each (this machine's): with one machine everything shares it; with M > 1,
Postgres has one machine to itself and the pipeline the other M - 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bench.harness import Harness
from bench.report import Figure

POSTGRES = "postgres"
NATS = "nats-server"
SOURCE = "simulator"  # the stand-in for Purple Flea: not part of the ledger's cost


@dataclass(frozen=True)
class Prediction:
    machines: int
    events_per_s: float
    bottleneck: str


def predict(
    cpu_us: dict[str, float], lock_ceiling: float, *, cores: int, machines: int, replicas: int = 1
) -> Prediction:
    """Events/s on ``machines`` machines of ``cores`` cores, and the stage that limits it."""
    services = sum(us for name, us in cpu_us.items() if name not in (POSTGRES, NATS, SOURCE))
    pipeline_us = services + replicas * cpu_us.get(NATS, 0.0)
    postgres_us = cpu_us.get(POSTGRES, 0.0)
    if machines == 1:
        limits = {"CPU of the one machine": cores * 1e6 / (pipeline_us + postgres_us)}
    else:
        limits = {
            "pipeline CPU (ingesters, writers, relay, projectors, NATS)": (machines - 1)
            * cores
            * 1e6
            / pipeline_us,
            "Postgres CPU (one primary)": cores * 1e6 / postgres_us if postgres_us else float("inf"),
        }
    limits["the global-order lock (one Postgres)"] = lock_ceiling
    bottleneck = min(limits, key=lambda k: limits[k])
    return Prediction(machines, limits[bottleneck], bottleneck)


def _inputs(h: Harness) -> tuple[dict[str, float], float] | None:
    e2e = next((f for f in h.figures if f.scenario == "end-to-end" and "cpu_s" in f.detail), None)
    writer = next((f for f in h.figures if f.scenario == "writer" and f.name.startswith("writer")), None)
    if e2e is None or writer is None or not e2e.value or not writer.value:
        return None
    seconds = max(e2e.detail["stages_s"].values())
    events = e2e.value * seconds
    cpu_us = {name: 1e6 * s / events for name, s in e2e.detail["cpu_s"].items()}
    return cpu_us, writer.value


async def run(h: Harness) -> None:
    inputs = _inputs(h)
    if inputs is None:
        h.add(Figure("capacity", "model", None, "events/s", note="needs the writer and e2e scenarios"))
        return
    cpu_us, ceiling = inputs
    cores = os.cpu_count() or 1
    per_stage = ", ".join(f"{n} {us:.0f}" for n, us in sorted(cpu_us.items(), key=lambda kv: -kv[1]))
    for replicas in (1, 3):
        for machines in (1, 2, 4, 8, 16):
            if replicas == 3 and machines < 4:
                continue  # three NATS nodes want machines of their own
            p = predict(cpu_us, ceiling, cores=cores, machines=machines, replicas=replicas)
            h.add(
                Figure(
                    "capacity",
                    f"predicted, {machines} machine{'s' * (machines > 1)} of {cores} cores, R{replicas}",
                    p.events_per_s,
                    "events/s",
                    note=f"first bottleneck: {p.bottleneck}; CPU µs per event: {per_stage}; "
                    f"global-order lock ceiling {ceiling:,.0f} events/s (writer scenario)",
                )
            )
