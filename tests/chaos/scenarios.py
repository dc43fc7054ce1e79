"""Each scenario's fault schedule as a pure function of its seed (see schedule.py for actions),
and the table of pipeline scenarios that tests/test_chaos.py runs, one body for all."""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from services.simulator import MALFORMED_KINDS, Simulator
from tests.chaos.checker import PROJECTIONS
from tests.chaos.fixtures import simulator
from tests.chaos.harness import BASE_ENV, PIPELINE, ChaosRun
from tests.chaos.poison import KINDS as POISON_KINDS
from tests.chaos.report import Verdict
from tests.chaos.schedule import Schedule, rng_for


def _schedule(scenario: str, seed: int, test: str) -> tuple[Schedule, random.Random]:
    return Schedule(scenario, seed, test), rng_for(scenario, seed)


def writer_sigkills(seed: int, test: str) -> Schedule:
    """3-4 SIGKILLs of the writer and the relay at random instants, each restarted after 0.1-1 s."""
    s, rng = _schedule("writer-sigkill", seed, test)
    t = rng.uniform(0.3, 1.0)
    for _ in range(rng.randint(3, 4)):
        s.add(t, "kill", "writer")
        s.add(t, "kill", "relay")
        t += rng.uniform(0.1, 1.0)
        s.add(t, "start", "writer")
        s.add(t, "start", "relay")
        t += rng.uniform(0.4, 1.2)
    return s


def writer_crash_points(seed: int, test: str) -> Schedule:
    """The writer dies after a commit before its ack, and the relay before and after publishing
    (while the writer runs, so that the relay has batches to publish)."""
    s, rng = _schedule("writer-crash-points", seed, test)
    points = ["writer.after_commit", "relay.before_publish", "relay.after_publish"]
    rng.shuffle(points)
    t = 0.0
    for point in points:
        service = point.partition(".")[0]
        s.add(t, "kill", service)
        s.add(t, "start", service, f"PFLEA_CRASH_AT={point}:{rng.randint(1, 4)}")
        s.add(t, "await-exit", service, "137")
        s.add(t, "start", service)
    return s


def projector_crash_points(seed: int, test: str) -> Schedule:
    """Two projectors die, one before its commit and one after its commit, before the ack."""
    s, rng = _schedule("projector-crash-points", seed, test)
    before, after = rng.sample(PROJECTIONS, 2)
    for name, point in ((before, "projector.before_commit"), (after, "projector.after_commit")):
        s.add(0.0, "kill", f"projector-{name}")
        s.add(0.0, "start", f"projector-{name}", f"PFLEA_CRASH_AT={point}:{rng.randint(1, 3)}")
    for name in (before, after):
        s.add(0.0, "await-exit", f"projector-{name}", "137")
        s.add(0.0, "start", f"projector-{name}")
    return s


def ingester_outlives_dedup_window(seed: int, test: str, window_s: float) -> Schedule:
    """The ingester publishes K pages and dies before any commit (no writer runs); it comes back
    after JetStream's duplicate window, so its re-published pages reach the writer twice. The
    writer starts only once the ingester is polling again: a writer that commits first would
    move the ingester's cursors past the pages to repeat (seen on a loaded machine)."""
    s, rng = _schedule("ingester-after-publish", seed, test)
    s.add(0.0, "start", "ingester", f"PFLEA_CRASH_AT=ingester.after_publish:{rng.randint(1, 3)}")
    s.add(0.0, "await-exit", "ingester", "137")
    s.add(window_s + 0.5, "start", "ingester")
    s.add(window_s + 0.5, "await-ready", "ingester")
    s.add(window_s + 0.5 + rng.uniform(0.0, 1.0), "start", "writer")
    return s


def nats_restarts(seed: int, test: str) -> Schedule:
    """nats-server stopped with SIGTERM and with SIGKILL (seeded order), down 0.3-2 s each."""
    s, rng = _schedule("nats-restart", seed, test)
    signals = ["TERM", "KILL"]
    rng.shuffle(signals)
    t = rng.uniform(0.5, 1.5)
    for sig in signals:
        s.add(t, "stop-nats", "nats", sig)
        t += rng.uniform(0.3, 2.0)
        s.add(t, "start-nats", "nats")
        t += rng.uniform(1.0, 2.0)
    return s


def postgres_immediate_stops(seed: int, test: str) -> Schedule:
    """Postgres stopped with -m immediate twice, down 0.3-1.5 s each; the writer also loses the
    reply of one commit (its outcome unknown to it) and must retry that batch safely."""
    s, rng = _schedule("postgres-immediate", seed, test)
    s.add(0.0, "start", "writer", f"PFLEA_FAIL_AT=writer.commit_reply_lost:{rng.randint(1, 3)}")
    t = rng.uniform(1.0, 2.0)
    for _ in range(2):
        s.add(t, "stop-postgres", "postgres", "immediate")
        t += rng.uniform(0.3, 1.5)
        s.add(t, "start-postgres", "postgres")
        t += rng.uniform(1.0, 2.0)
    return s


def servers_paused(seed: int, test: str, ack_wait_s: float) -> Schedule:
    """nats-server and Postgres SIGSTOPped past the ack wait, together or overlapping."""
    s, rng = _schedule("servers-paused", seed, test)
    t = rng.uniform(0.5, 1.5)
    first, second = rng.sample(["nats", "postgres"], 2)
    s.add(t, "pause", first)
    s.add(t + rng.uniform(0.0, 1.5), "pause", second)
    end = t + ack_wait_s + rng.uniform(0.5, 1.5)
    s.add(end, "resume", first)
    s.add(end + rng.uniform(0.0, 1.0), "resume", second)
    return s


def source_storms(seed: int, test: str) -> Schedule:
    """Phases of repeated/overlapping pages, 429 storms, 5xx and hangs, in seeded order."""
    s, rng = _schedule("source-storms", seed, test)
    phases = [
        {"repeat_page_rate": 0.6},
        {"too_many_requests_rate": 0.9, "retry_after": 1},
        {"server_error_rate": 0.7},
        {"hang_rate": 0.5, "hang_s": 3.0},
        {"repeat_page_rate": 0.3, "too_many_requests_rate": 0.2, "server_error_rate": 0.2, "hang_rate": 0.2},
    ]
    rng.shuffle(phases)
    t = 0.3
    for knobs in phases:
        s.add(t, "source-faults", "simulator", json.dumps(knobs))
        t += rng.uniform(0.6, 1.2)
    s.add(t, "source-faults", "simulator", "{}")
    return s


def poison_feed(seed: int, test: str, agents: list[str]) -> Schedule:
    """Each hand-made poison kind (NaN token, invalid UTF-8, deep nesting...) lands in a seeded
    agent's feed at a seeded moment, on top of the simulator's own malformed items."""
    s, rng = _schedule("poison", seed, test)
    t = 0.2
    for kind in [*POISON_KINDS, *rng.sample(POISON_KINDS, 2)]:
        s.add(t, "poison", rng.choice(agents), kind)
        t += rng.uniform(0.2, 0.6)
    return s


def clock_jumps(seed: int, test: str, services: list[str]) -> Schedule:
    """Each skewed service's wall clock jumps +1 h and -1 h (seeded order and times), and is
    left an hour off, so that it also stops with a skewed clock."""
    s, rng = _schedule("clock-skew", seed, test)
    for name in services:
        t = rng.uniform(0.2, 1.0)
        offsets = ["+1h", "-1h"]
        rng.shuffle(offsets)
        for offset in [*offsets, "+0", rng.choice(["+1h", "-1h"])]:
            s.add(t, "clock", name, offset)
            t += rng.uniform(0.5, 1.2)
    s.steps.sort(key=lambda step: step.at_s)
    return s


def command_race(seed: int, test: str) -> Schedule:
    """While commands race, each of the two writers is SIGKILLed once and restarted."""
    s, rng = _schedule("command-race", seed, test)
    for writer in rng.sample(["writer", "writer-2"], 2):
        t = rng.uniform(0.1, 1.5)
        s.add(t, "kill", writer)
        s.add(t + rng.uniform(0.3, 1.0), "start", writer)
    s.steps.sort(key=lambda step: step.at_s)
    return s


def slow_projector(seed: int, test: str, ack_wait_s: float) -> tuple[Schedule, str]:
    """Two replicas of one projector whose every batch takes longer than the ack wait."""
    s, rng = _schedule("slow-projector", seed, test)
    slow = rng.choice(PROJECTIONS)
    delay = round(ack_wait_s * rng.uniform(1.2, 1.6), 2)
    for replica in (f"projector-{slow}", f"projector-{slow}-2"):
        s.add(0.0, "start", replica, f"PFLEA_DELAY_AT=projector.apply:{delay}")
    return s, slow


# The table: every scenario run on the pipeline the same way (start, play the schedule, finish,
# check), with what it needs beyond that and what it must show beyond the checker's invariants.

ScheduleFor = Callable[[int, str, Simulator], Schedule]
Expectation = Callable[[ChaosRun, Verdict], Awaitable[None]]


async def _nothing_more(run: ChaosRun, verdict: Verdict) -> None:
    """The checker's invariants are the whole claim."""


async def _nothing_to_measure(run: ChaosRun) -> None:
    """Nothing to read from the running services."""


@dataclass(frozen=True)
class Scenario:
    name: str
    claim: str  # what a passing run shows, as a test name would say it
    schedule: ScheduleFor
    expect: Expectation = _nothing_more
    simulator: Callable[[int], Simulator] = simulator
    env: dict[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = PIPELINE
    prepare: Callable[[ChaosRun], None] = lambda run: None  # before the services start
    measure: Callable[[ChaosRun], Awaitable[None]] = _nothing_to_measure  # converged, before they stop

    def __str__(self) -> str:
        return self.name


DEDUP_WINDOW_S = 2.0  # JetStream's minimum is 100 ms; 2 s passes quickly and is never flaky


async def _writer_duplicates(run: ChaosRun) -> None:
    run.notes["writer_duplicates"] = int(
        (await run.proc("writer").metrics()).get("pflea_writer_duplicates_total", 0)
    )


async def _repeats_got_past_jetstream(run: ChaosRun, verdict: Verdict) -> None:
    # The scenario proves what it claims only if JetStream really let the repeats through. PFLEA_TX
    # is a work queue (what the writer stored is gone from it), so the writer says: it met them,
    # already stored (JetStream's dedup window drops a repeat before any consumer sees it).
    duplicates = run.notes.get("writer_duplicates", 0)
    assert duplicates, "the writer met no repeat: JetStream's dedup stopped them all"


async def _a_commit_reply_was_lost(run: ChaosRun, verdict: Verdict) -> None:
    lost_reply = "writer.commit_reply_lost" in run.proc("writer").log_path.read_text()
    assert lost_reply, "the writer never lost a commit's reply: the unknown-outcome retry went untested"


async def _every_storm_was_served(run: ChaosRun, verdict: Verdict) -> None:
    stats = run.sim.stats if run.sim else None
    assert stats is not None and stats.too_many_requests and stats.server_errors and stats.hangs
    assert stats.repeated_pages, "the schedule must have served repeated pages"


async def _every_poison_kind_was_served(run: ChaosRun, verdict: Verdict) -> None:
    seen = {tx.malformed for tx in run.truth() if tx.malformed}
    assert seen >= {*MALFORMED_KINDS, *POISON_KINDS}, f"kinds never served: {set(MALFORMED_KINDS) - seen}"


def _skewed(seed: int) -> list[str]:
    victim = rng_for("clock-skew-victim", seed).choice(["balance", "pnl"])
    return ["ingester", "writer", f"projector-{victim}", "relay"]


def _skew_clocks(run: ChaosRun) -> None:
    clocks = [run.skew_clock(name) for name in _skewed(run.schedule.seed)]
    run.notes["clock"] = clocks[0].mechanism.split(" ")[0]


async def _order_kept_and_clocks_really_skewed(run: ChaosRun, verdict: Verdict) -> None:
    assert verdict.findings.reordered == 0, f"events out of source order: {verdict.findings.reorder_samples}"
    # The skew really happened: each skewed service's own log stamps its start and stop an hour apart.
    spans = {name: _log_time_span_h(run.proc(name).log_path) for name in _skewed(run.schedule.seed)}
    assert all(span >= 0.9 for span in spans.values()), f"log time spans (hours): {spans}"


def _log_time_span_h(log: Path) -> float:
    stamps = [
        datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00"))
        for line in log.read_text().splitlines()
        if line.startswith('{"ts"')
    ]
    return (max(stamps) - min(stamps)).total_seconds() / 3600 if stamps else 0.0


ACK_WAIT_S = float(BASE_ENV["PFLEA_ACK_WAIT_S"])

SCENARIOS = [
    Scenario(
        "writer-sigkill",
        "the writer SIGKILLed at random points under load loses and doubles nothing",
        lambda seed, test, sim: writer_sigkills(seed, test),
    ),
    Scenario(
        "writer-crash-points",
        "the writer killed after commit before ack, or before/after relaying, loses and doubles nothing",
        lambda seed, test, sim: writer_crash_points(seed, test),
    ),
    Scenario(
        "projector-crash-points",
        "a projector killed before or after its commit applies everything once",
        lambda seed, test, sim: projector_crash_points(seed, test),
    ),
    Scenario(
        "ingester-after-publish",
        "the ingester republishing after the dedup window is stopped by the database",
        lambda seed, test, sim: ingester_outlives_dedup_window(seed, test, DEDUP_WINDOW_S),
        _repeats_got_past_jetstream,
        measure=_writer_duplicates,
        # The backlog only: every page is published before any commit.
        simulator=lambda seed: simulator(seed, rate=0),
        env={"PFLEA_DUPLICATE_WINDOW_S": str(DEDUP_WINDOW_S)},
        services=tuple(n for n in PIPELINE if n.startswith("projector-") or n == "relay"),
    ),
    Scenario(
        "nats-restart",
        "nats-server restarted with SIGTERM and SIGKILL under load recovers without help",
        lambda seed, test, sim: nats_restarts(seed, test),
    ),
    Scenario(
        "postgres-immediate",
        "Postgres stopped -m immediate under load: unknown commits are retried safely",
        lambda seed, test, sim: postgres_immediate_stops(seed, test),  # it starts the writer
        _a_commit_reply_was_lost,
        services=tuple(name for name in PIPELINE if name != "writer"),
    ),
    Scenario(
        "servers-paused",
        "NATS and Postgres paused past the ack wait resume without loss",
        lambda seed, test, sim: servers_paused(seed, test, ACK_WAIT_S),
    ),
    Scenario(
        "source-storms",
        "repeated pages, 429 storms, 5xx and hangs lose and double nothing",
        lambda seed, test, sim: source_storms(seed, test),
        _every_storm_was_served,
        env={"PFLEA_INGEST_TIMEOUT_S": "0.5"},  # a hang is a timeout, well before hang_s
    ),
    Scenario(
        "poison",
        "every poison kind is quarantined and none stalls the pipeline",
        lambda seed, test, sim: poison_feed(seed, test, list(sim.feeds)),
        _every_poison_kind_was_served,
        simulator=lambda seed: simulator(seed, backlog=50, malformed_rate=0.4),  # >= 17 malformed per agent
    ),
    Scenario(
        "clock-skew",
        "wall clocks jumping an hour neither reorder nor drop anything",
        lambda seed, test, sim: clock_jumps(seed, test, _skewed(seed)),
        _order_kept_and_clocks_really_skewed,
        prepare=_skew_clocks,
    ),
]
