"""Chaos: the servers under the pipeline die, restart and hang, under load; nobody steps in.

nats-server and Postgres belong to this module (tests/chaos/servers.py), so a scenario may
SIGKILL, stop with ``-m immediate`` or SIGSTOP them. After the faults every service must carry
on by itself (reconnects, the PullLoop watchdog, retried commits) and the checker must pass.
Seeds: ``PFLEA_CHAOS_SEEDS`` (default 1,2,3).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import scenarios
from tests.chaos.fixtures import chaos_run, chaos_servers_fixture, simulator  # noqa: F401 - fixture
from tests.chaos.harness import BASE_ENV, PIPELINE
from tests.chaos.schedule import chaos_seeds
from tests.chaos.servers import ChaosServers

pytestmark = [pytest.mark.chaos, pytest.mark.parametrize("seed", chaos_seeds())]


def _test_id(request: pytest.FixtureRequest) -> str:
    return request.node.nodeid.split("[")[0]


async def test_nats_restarted_with_sigterm_and_sigkill_under_load_recovers_without_help(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    schedule = scenarios.nats_restarts(seed, _test_id(request))
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=simulator(seed)) as run:
        await run.start_services()
        await run.play()
        verdict = await run.finish()
    assert verdict.ok, verdict.explain()


async def test_postgres_stopped_immediately_under_load_retries_unknown_commits_safely(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    schedule = scenarios.postgres_immediate_stops(seed, _test_id(request))  # it starts the writer
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=simulator(seed)) as run:
        await run.start_services(tuple(name for name in PIPELINE if name != "writer"))
        await run.play()
        verdict = await run.finish()
        lost_reply = "writer.commit_reply_lost" in run.proc("writer").log_path.read_text()
    assert verdict.ok, verdict.explain()
    assert lost_reply, "the writer never lost a commit's reply: the unknown-outcome retry went untested"


async def test_nats_and_postgres_paused_past_the_ack_wait_resume_without_loss(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    schedule = scenarios.servers_paused(seed, _test_id(request), float(BASE_ENV["PFLEA_ACK_WAIT_S"]))
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=simulator(seed)) as run:
        await run.start_services()
        await run.play()
        verdict = await run.finish()
    assert verdict.ok, verdict.explain()
