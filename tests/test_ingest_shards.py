"""Ingester replicas share the agents: three against one simulator, one SIGKILLed, one added.

Every transaction must still be stored exactly once, the dead replica's slots taken over, a new
replica given its share, and no agent polled by two replicas at once. Who polled which slot
when is read from the replicas' own logs ("polling slot N" … "stopped polling slot N"): two
replicas' intervals on one slot that intersect are an overlap.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import nats
import pytest

from devstack.processes import ServiceProcess, wait_until
from services.simulator import FaultKnobs, Simulator, load_simulator_config, running_simulator
from shared.settings import Settings
from tests.support import service_env, simulator_feeds
from tests.test_ingest_pipeline import accounted, assert_exactly_once

SLOTS = 32
AGENTS = 240
PER_AGENT = 40


def _intervals(log: Path, killed_at: float | None) -> dict[int, list[tuple[float, float]]]:
    """Per slot, the (start, stop) wall times this replica polled it; open ones end at
    ``killed_at`` (or now)."""
    open_: dict[int, float] = {}
    spans: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if "slot" not in entry or entry.get("logger") != "services.ingester.shards":
            continue
        at = time.mktime(time.strptime(entry["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        at += int(entry["ts"][20:23]) / 1000
        slot = int(entry["slot"])
        if entry["msg"].startswith("polling slot"):
            open_[slot] = at
        elif entry["msg"].startswith("stopped polling slot") and slot in open_:
            spans[slot].append((open_.pop(slot), at))
    end = killed_at if killed_at is not None else time.time()
    for slot, start in open_.items():
        spans[slot].append((start, end))
    return spans


def overlaps(replicas: dict[str, dict[int, list[tuple[float, float]]]]) -> int:
    """Pairs of intervals of two replicas on one slot that intersect."""
    found = 0
    names = sorted(replicas)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for slot, spans in replicas[a].items():
                for start, stop in spans:
                    found += sum(1 for s, e in replicas[b].get(slot, []) if s < stop and start < e)
    return found


async def slots_held(replicas: list[ServiceProcess]) -> list[int]:
    return [int((await r.metrics()).get("pflea_ingester_slots_held", 0)) for r in replicas]


@pytest.mark.chaos
async def test_replicas_share_the_agents_through_a_sigkill_and_a_newcomer_exactly_once(
    settings: Settings, js_streams: nats.NATS, tmp_path: Path
) -> None:
    sim = Simulator(
        load_simulator_config(
            {},
            port=0,
            seed=23,
            agents=AGENTS,
            backlog=10,
            rate=200,
            max_per_agent=PER_AGENT,
            faults=FaultKnobs(repeat_page_rate=0.1),
        )
    )
    async with running_simulator(sim.config, sim) as url:
        agents = ",".join(f"{c.agent_id}:{c.api_key}" for c in sim.credentials)
        env = service_env(
            settings,
            PURPLEFLEA_API_URL=url,
            PURPLEFLEA_AGENTS=agents,
            PURPLEFLEA_FEEDS=simulator_feeds(url),
            PFLEA_INGEST_SLOTS=str(SLOTS),
            PFLEA_INGEST_POLL_INTERVAL_S="0.2",
            PFLEA_INGEST_IDLE_POLL_MAX_S="1",
            PFLEA_INGEST_PAGE_LIMIT="50",
        )
        replicas = [
            ServiceProcess("services.ingester", env, tmp_path, name=f"ingester-{i}") for i in range(4)
        ]
        writer = ServiceProcess("services.writer", env, tmp_path)
        try:
            writer.start()
            for replica in replicas[:3]:
                replica.start()
            for replica in replicas[:3]:
                await replica.wait_ready(60)

            async def spread(live: list[ServiceProcess]) -> bool:
                held = await slots_held(live)
                return sum(held) == SLOTS and all(held)

            await wait_until(lambda: spread(replicas[:3]), 60, "three replicas sharing every slot", 0.2)
            three = await slots_held(replicas[:3])
            total = AGENTS * PER_AGENT
            await wait_until(
                lambda: _progress(settings, sim, total // 4), 120, "a quarter ingested", interval=0.5
            )

            victim = replicas[0]
            victim.kill()
            killed_at = time.time()
            killed = time.monotonic()
            await wait_until(
                lambda: _all_held(replicas[1:3]), 60, "the survivors taking the dead replica's slots", 0.1
            )
            takeover_s = time.monotonic() - killed

            replicas[3].start()
            await replicas[3].wait_ready(60)
            joined = time.monotonic()
            await wait_until(lambda: spread(replicas[1:]), 60, "the newcomer getting its share", 0.1)
            rebalance_s = time.monotonic() - joined
            after_join = await slots_held(replicas[1:])

            await wait_until(
                lambda: _progress(settings, sim, total, everything=True),
                180,
                "every transaction accounted for",
                interval=1.0,
            )
            detected = 0.0
            for replica in replicas[1:]:
                detected += (await replica.metrics()).get("pflea_ingester_overlapping_polls_total", 0)
            for replica in replicas[1:]:
                assert replica.terminate() == 0, replica.log_tail()
            assert writer.terminate() == 0, writer.log_tail()
        finally:
            for process in (*replicas, writer):
                process.kill()

    await assert_exactly_once(settings.database_url, sim)
    spans = {
        r.name: _intervals(r.log_path, killed_at if r is victim else None)
        for r in replicas
        if r.log_path.exists()
    }
    by_log = overlaps(spans)
    print(
        f"\nshards: {SLOTS} slots, {AGENTS} agents x 6 feeds; slots held by three {three}; "
        f"takeover after SIGKILL {takeover_s:.1f}s (lease TTL 6s); newcomer's share after "
        f"{rebalance_s:.1f}s, held {after_join}; overlapping polls: {by_log} by the logs, "
        f"{int(detected)} detected by the replicas"
    )
    assert victim_slots_were_real(spans[victim.name]), "the SIGKILLed replica polled slots when it died"
    assert by_log == 0, "two replicas polled one slot's agents at once"
    assert detected == 0


def victim_slots_were_real(spans: dict[int, list[tuple[float, float]]]) -> bool:
    return any(spans.values())


async def _all_held(survivors: list[ServiceProcess]) -> bool:
    return sum(await slots_held(survivors)) == SLOTS


async def _progress(settings: Settings, sim: Simulator, at_least: int, *, everything: bool = False) -> bool:
    found, kept = await accounted(settings.database_url, sim)
    if everything:
        return sim.stats.generated >= at_least and found == kept
    return found >= at_least
