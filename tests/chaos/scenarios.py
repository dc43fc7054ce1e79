"""Each scenario's fault schedule as a pure function of its seed (see schedule.py for actions)."""

from __future__ import annotations

import json
import random

from tests.chaos.checker import PROJECTIONS
from tests.chaos.poison import KINDS as POISON_KINDS
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
    after JetStream's duplicate window, so its re-published pages reach the writer twice."""
    s, rng = _schedule("ingester-after-publish", seed, test)
    s.add(0.0, "start", "ingester", f"PFLEA_CRASH_AT=ingester.after_publish:{rng.randint(1, 3)}")
    s.add(0.0, "await-exit", "ingester", "137")
    s.add(window_s + 0.5, "start", "ingester")
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
