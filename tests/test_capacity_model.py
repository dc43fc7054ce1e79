"""The bench's capacity model: which stage stops the pipeline first, by the arithmetic it states."""

from __future__ import annotations

import pytest

from bench.capacity import predict

CPU_US = {
    "ingester": 300.0,
    "writer": 100.0,
    "relay": 100.0,
    "projector-balance": 100.0,
    "nats-server": 100.0,
}


def test_one_machine_shares_its_cores_between_the_pipeline_and_postgres() -> None:
    p = predict({**CPU_US, "postgres": 200.0, "simulator": 999.0}, 50_000, cores=2, machines=1)
    assert p.events_per_s == pytest.approx(2e6 / 900)  # the source's CPU is not the ledger's
    assert p.bottleneck == "CPU of the one machine"


def test_more_machines_scale_the_pipeline_until_postgres_or_the_lock_stops_it() -> None:
    cpu = {**CPU_US, "postgres": 200.0}
    two = predict(cpu, 50_000, cores=2, machines=2)
    assert two.events_per_s == pytest.approx(2e6 / 700) and two.bottleneck.startswith("pipeline")
    many = predict(cpu, 50_000, cores=2, machines=16)
    assert many.events_per_s == pytest.approx(2e6 / 200) and many.bottleneck.startswith("Postgres")
    locked = predict(cpu, 5_000, cores=2, machines=16)
    assert locked.events_per_s == 5_000 and "lock" in locked.bottleneck


def test_three_replicas_count_nats_three_times() -> None:
    r1 = predict({**CPU_US, "postgres": 1.0}, 1e9, cores=2, machines=2)
    r3 = predict({**CPU_US, "postgres": 1.0}, 1e9, cores=2, machines=2, replicas=3)
    assert 2e6 / r3.events_per_s - 2e6 / r1.events_per_s == pytest.approx(200.0)
