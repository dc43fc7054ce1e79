"""Soak: the whole pipeline under a steady live load for minutes or hours.

``python -m bench --only soak --minutes N --rate R [--soak-agents A]``. The simulator (its own
process, ``PFLEA_SIM_RATE=R`` over ``A`` agents, no backlog, its bounded default history) feeds
the ingester, writer, relay and four projectors, all at default durability. Every
``soak_sample_s`` (30 s) the run records: events stored and the rate since the last sample,
each projection's and the relay's lag (events and seconds, from ``projection_status`` /
``tailer_status``, as ``pflea status`` shows them), the ingester's lag behind the feed (what the
simulator generated and is neither an event nor in quarantine yet; seconds of it at the offered
rate), each process's RSS and CPU share (nats-server's and Postgres's too), how busy the whole
machine was, and Postgres's checkpoints and WAL written: what to look at when lag jumps.

After a warm-up (a quarter of the run, at most 5 minutes) it reports:

- the events/s stored against the rate offered (a ratio: below ~1 means the ingester falls behind);
- the worst lag in seconds of any projection or the relay (target: under 5 s), and apart from
  it how far the ingester is behind the feed (worst, median and samples over 5 s; the same
  5 s held up to it: it is the polling cycle, set by (agents × feeds) / polls per second);
- whether lag is bounded: its growth in events per minute over the run after warm-up, by a
  least-squares line (target: no more than 1% of the offered rate per minute);
- each process's RSS growth in MB per hour, by a least-squares line (target: under 10 MB/h);
- error lines in the services' logs (target: none);
- cursors the feed had pruned (information: a reset re-reads the feed from its oldest kept item);
- transactions the simulator pruned from its bounded history before any page had served them,
  over the whole run (target: none; no reader can ever have them).

The samples are written to ``bench/soak/soak-<rate>-<minutes>m.json`` with an SVG chart of lag
and one of RSS over time beside it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncpg
import psutil

from bench.harness import Harness, server_pids
from bench.pipeline import Pipeline
from bench.processes import BenchError, RssSampler, cpu_seconds
from bench.report import Figure, Target
from bench.svg import line_chart
from services.ingester.poller import CURSOR_RESET
from services.simulator.feed import FEEDS

HERE = Path(__file__).resolve().parent / "soak"
MB = 1024 * 1024
WORST_LAG_S = 5.0
RSS_GROWTH_MB_PER_H = 10.0
LAG_GROWTH_SHARE = 0.01  # of the offered rate, per minute


@dataclass
class Sample:
    t_s: float  # since the load started
    events: int
    events_per_s: float
    lag_events: dict[str, int] = field(default_factory=dict)
    lag_s: dict[str, float] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    cpu_share: dict[str, float] = field(default_factory=dict)  # of one core, since the last sample
    feed_requests_per_s: float = 0.0  # the simulator's, since the last sample: the polls made
    pruned_unread: int = 0  # the simulator's, since the start: pruned before any page served them
    machine_busy: float = 0.0  # share of all cores busy since the last sample, whatever ran
    checkpoints: int = 0  # Postgres checkpoints since the start (timed + requested)
    wal_mb_per_s: float = 0.0  # Postgres WAL written since the last sample


FEED = "ingester"  # the reader name of the ingester's lag behind the feed, in Sample.lag_s


def lag_summary(steady: list[Sample]) -> dict[str, float]:
    """The worst lag of the projections and the relay, and the ingester's behind the feed: its
    worst, median, and the samples over WORST_LAG_S."""
    readers = [v for s in steady for name, v in s.lag_s.items() if name != FEED]
    feed = sorted(s.lag_s[FEED] for s in steady if FEED in s.lag_s)
    return {
        "worst_reader_lag_s": max(readers, default=0.0),
        "feed_lag_worst_s": feed[-1] if feed else 0.0,
        "feed_lag_median_s": feed[len(feed) // 2] if feed else 0.0,
        "feed_lag_samples_over": float(sum(1 for v in feed if v > WORST_LAG_S)),
        "samples": float(len(steady)),
    }


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


async def _lags(conn: asyncpg.Connection) -> tuple[dict[str, int], dict[str, float]]:
    rows = await conn.fetch(
        """SELECT 'projector-' || projection AS reader, lag_events, lag_seconds FROM projection_status
           UNION ALL
           SELECT kind, lag_events, lag_seconds FROM tailer_status WHERE kind = 'relay'"""
    )
    return (
        {r["reader"]: int(r["lag_events"]) for r in rows},
        {r["reader"]: float(r["lag_seconds"]) for r in rows},
    )


async def _feed_lag(conn: asyncpg.Connection, stats: dict[str, int], rate: float) -> tuple[int, float]:
    """How far the ingester is behind the feed: transactions generated that are neither an
    event nor quarantined, and the seconds that is at the offered rate."""
    landed = await conn.fetchval("SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM quarantine)")
    behind = max(0, int(stats["generated"]) - int(landed))
    return behind, round(behind / rate, 2) if rate > 0 else 0.0


async def _postgres_io(conn: asyncpg.Connection) -> tuple[int, int]:
    """(checkpoints so far, WAL bytes so far) of the whole Postgres server."""
    row = await conn.fetchrow(
        """SELECT (SELECT num_timed + num_requested FROM pg_stat_checkpointer) AS checkpoints,
                  (SELECT wal_bytes FROM pg_stat_wal) AS wal"""
    )
    return int(row["checkpoints"]), int(row["wal"])


class Sampler:
    def __init__(self, p: Pipeline, rate: float, servers: dict[str, tuple[int, bool]]) -> None:
        """``servers``: name → (pid, with its children) of nats-server and Postgres."""
        self.p = p
        self.rate = rate
        self.pids = {proc.name: (proc.pid, False) for proc in p.processes} | servers
        self.cpu = {name: cpu_seconds(pid, tree=tree) for name, (pid, tree) in self.pids.items()}
        self.last = (time.monotonic(), 0)
        self.requests = 0
        self.io = (0, 0)  # Postgres (checkpoints, WAL bytes) at the last sample
        self.checkpoints_at_start = 0
        psutil.cpu_percent()  # the machine's busy share is measured from here

    async def start(self, conn: asyncpg.Connection) -> None:
        self.io = await _postgres_io(conn)
        self.checkpoints_at_start = self.io[0]

    async def take(self, conn: asyncpg.Connection, started: float) -> Sample:
        now = time.monotonic()
        events = int(await conn.fetchval("SELECT coalesce(max(position), 0) FROM events"))
        lag_events, lag_s = await _lags(conn)
        stats = await self.p.simulator_stats()
        if not stats:
            raise BenchError("the simulator's /admin/stats did not answer")
        lag_events["ingester"], lag_s["ingester"] = await _feed_lag(conn, stats, self.rate)
        then, before = self.last
        per_s = 1 / (now - then) if now > then else 0.0
        sample = Sample(
            t_s=round(now - started, 1),
            events=events,
            events_per_s=round((events - before) * per_s, 1),
            lag_events=lag_events,
            lag_s=lag_s,
            feed_requests_per_s=round((stats["requests"] - self.requests) * per_s, 1),
            pruned_unread=int(stats.get("pruned_unread", 0)),
            machine_busy=round(psutil.cpu_percent() / 100, 3),
        )
        checkpoints, wal = await _postgres_io(conn)
        sample.checkpoints = checkpoints - self.checkpoints_at_start
        sample.wal_mb_per_s = round((wal - self.io[1]) * per_s / MB, 2)
        self.io = (checkpoints, wal)
        self.requests = int(stats["requests"])
        for name, (pid, tree) in self.pids.items():
            cpu = cpu_seconds(pid, tree=tree)
            # Postgres's backends come and go (autovacuum): a tree's CPU can fall; never below 0.
            sample.cpu_share[name] = round(max(0.0, cpu - self.cpu[name]) * per_s, 3)
            self.cpu[name] = cpu
            if tree:  # a server: its memory is not the pipeline's
                continue
            try:
                sample.rss_mb[name] = round(psutil.Process(pid).memory_info().rss / MB, 1)
            except psutil.Error:
                sample.rss_mb[name] = 0.0
        self.last = (now, events)
        return sample


def _is_error(line: str) -> bool:
    return '"level":"error"' in line or '"level":"critical"' in line


def _is_cursor_reset(line: str) -> bool:
    """The ingester's warning that the feed pruned a cursor: what it had not read yet is gone."""
    return CURSOR_RESET in line


def _log_lines(p: Pipeline, matches: Callable[[str], bool]) -> dict[str, int]:
    """Lines ``matches`` accepts, per service log (JSON lines)."""
    found: dict[str, int] = {}
    for proc in p.processes:
        try:
            text = proc.log_path.read_text(errors="replace")
        except OSError:
            continue
        n = sum(1 for line in text.splitlines() if matches(line))
        if n:
            found[proc.name] = n
    return found


def write_results(stem: Path, samples: list[Sample], summary: dict[str, object]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"summary": summary, "samples": [asdict(s) for s in samples]}, indent=1) + "\n"
    )
    minutes = [s.t_s / 60 for s in samples]
    readers = sorted({r for s in samples for r in s.lag_s})
    lag = {r: [(m, s.lag_s.get(r, 0.0)) for m, s in zip(minutes, samples, strict=True)] for r in readers}
    names = sorted({n for s in samples for n in s.rss_mb})
    rss = {n: [(m, s.rss_mb.get(n, 0.0)) for m, s in zip(minutes, samples, strict=True)] for n in names}
    title = f"soak at {summary['rate']:g} tx/s offered"
    (stem.parent / f"{stem.name}-lag.svg").write_text(
        line_chart(f"{title}: lag per reader", "minutes", "lag (s)", lag)
    )
    (stem.parent / f"{stem.name}-rss.svg").write_text(
        line_chart(f"{title}: resident memory per process", "minutes", "RSS (MB)", rss)
    )


async def run(h: Harness) -> None:
    minutes, rate, agents = h.sizes.soak_minutes, h.sizes.soak_rate, h.sizes.soak_agents
    rss = RssSampler()
    rss.start()
    p = Pipeline(h, "soak", rss)
    await p.prepare()
    try:
        await p.start_sinks()
        await p.start_simulator(agents, 0, rate, bounded=True)
        started = await p.start_ingester()
        samples = await _soak(h, p, started, minutes * 60, rate)
        errors, resets = _log_lines(p, _is_error), _log_lines(p, _is_cursor_reset)
    finally:
        p.stop()
        await rss.stop()
        await p.cleanup()
    _report(h, samples, errors, resets, minutes, rate, agents)


async def _soak(h: Harness, p: Pipeline, started: float, duration_s: float, rate: float) -> list[Sample]:
    conn = await asyncpg.connect(p.database_url)
    try:
        sampler = Sampler(p, rate, server_pids(h))
        await sampler.start(conn)
        samples: list[Sample] = []
        while time.monotonic() - started < duration_s:
            left = duration_s - (time.monotonic() - started)
            await asyncio.sleep(min(h.sizes.soak_sample_s, max(0.0, left)))
            for proc in p.processes:
                if not proc.alive:
                    raise BenchError(f"{proc.name} exited during the soak:\n{proc.log_tail()}")
            samples.append(await sampler.take(conn, started))
            last = samples[-1]
            print(
                f"  soak {last.t_s / 60:5.1f} min: {last.events:,} events ({last.events_per_s:,.0f}/s), "
                f"worst lag {max(last.lag_s.values(), default=0):.1f} s, ingester behind the feed "
                f"{last.lag_events['ingester']:,}; machine {last.machine_busy:.0%} busy, "
                f"{last.checkpoints} checkpoints, WAL {last.wal_mb_per_s:.1f} MB/s",
                flush=True,
            )
        return samples
    finally:
        await conn.close()


def _report(
    h: Harness,
    samples: list[Sample],
    errors: dict[str, int],
    resets: dict[str, int],
    minutes: float,
    rate: float,
    agents: int,
) -> None:
    if len(samples) < 2:
        raise BenchError("the soak took fewer than two samples: run it longer (--minutes)")
    warm_s = min(300.0, minutes * 60 / 4)
    steady = [s for s in samples if s.t_s >= warm_s] or samples[-2:]
    stored_rate = (steady[-1].events - steady[0].events) / max(steady[-1].t_s - steady[0].t_s, 1e-9)
    worst_lag = max((v for s in steady for v in s.lag_s.values()), default=0.0)
    lags = lag_summary(steady)
    total_lag = [(s.t_s / 60, float(max(s.lag_events.values(), default=0))) for s in steady]
    lag_growth = slope(total_lag)  # events per minute
    polls_per_s = sum(s.feed_requests_per_s for s in steady) / len(steady)
    pairs = agents * len(FEEDS)
    growth = {
        name: slope([(s.t_s / 3600, s.rss_mb[name]) for s in steady if name in s.rss_mb])
        for name in steady[-1].rss_mb
    }
    summary: dict[str, object] = {
        "minutes": minutes,
        "rate": rate,
        "agents": agents,
        "warm_up_s": warm_s,
        "stored_per_s": round(stored_rate, 1),
        "worst_lag_s": worst_lag,
        **lags,
        "lag_growth_events_per_min": round(lag_growth, 1),
        "feed_requests_per_s": round(polls_per_s, 1),
        "rss_growth_mb_per_h": {k: round(v, 1) for k, v in growth.items()},
        "error_lines": errors,
        "cursor_resets": resets,
        "pruned_unread": samples[-1].pruned_unread,
    }
    stem = HERE / f"soak-{rate:g}-{minutes:g}m"
    write_results(stem, samples, summary)
    where = f"samples and charts: {stem.relative_to(HERE.parent.parent)}.json, -lag.svg, -rss.svg"
    h.add(
        Figure(
            "soak",
            f"stored events/s at {rate:g}/s offered ({minutes:g} min, {agents} agents)",
            round(stored_rate, 1),
            "events/s",
            "offered rate",
            rate,
            Target("min", 0.98, on="ratio"),
            note=where,
            detail=summary,
        )
    )
    lag_target = Target("max", WORST_LAG_S, unit="s")
    h.add(
        Figure(
            "soak",
            "worst lag of a projection or the relay after warm-up",
            lags["worst_reader_lag_s"],
            "s",
            target=lag_target,
            note="projection_status / tailer_status lag_seconds, as pflea status shows them",
        )
    )
    h.add(
        Figure(
            "soak",
            "ingester behind the feed after warm-up, worst",
            lags["feed_lag_worst_s"],
            "s",
            target=lag_target,
            note=f"median {lags['feed_lag_median_s']:.1f} s; {lags['feed_lag_samples_over']:.0f} of "
            f"{lags['samples']:.0f} samples over {WORST_LAG_S:g} s; generated by the simulator and not yet "
            "an event nor quarantined, in seconds at the offered rate: the polling cycle",
        )
    )
    h.add(
        Figure(
            "soak",
            "lag growth after warm-up (events/min)",
            round(lag_growth, 1),
            "events/min",
            target=Target("max", LAG_GROWTH_SHARE * rate * 60, unit="events/min"),
            note="least-squares slope of the largest reader lag in events; ~0 means bounded",
        )
    )
    worst_name = max(growth, key=lambda n: growth[n])
    h.add(
        Figure(
            "soak",
            f"largest RSS growth after warm-up ({worst_name})",
            round(growth[worst_name], 1),
            "MB/h",
            target=Target("max", RSS_GROWTH_MB_PER_H, unit="MB/h"),
            note=", ".join(f"{n} {g:+.1f}" for n, g in sorted(growth.items())),
        )
    )
    h.add(
        Figure(
            "soak",
            "error lines in service logs",
            float(sum(errors.values())),
            "lines",
            target=Target("max", 0, unit="lines"),
            note=", ".join(f"{n}: {c}" for n, c in errors.items()) or "none",
        )
    )
    h.add(
        Figure(
            "soak",
            "feed requests/s after warm-up (the ingester's polls)",
            round(polls_per_s, 1),
            "requests/s",
            note=f"information: {pairs:,} (agent, feed) pairs, polled every "
            f"{pairs / polls_per_s if polls_per_s else float('inf'):.1f} s on average, busy ones more "
            "often (intervals ~ 1/sqrt(rate)); with the pollers saturated, an item waits a fraction of "
            "that for its poll, so the ingester's lag follows pairs / requests per second",
        )
    )
    h.add(
        Figure(
            "soak",
            "cursors the feed had pruned (the feed read again from its oldest kept)",
            float(sum(resets.values())),
            "resets",
            note="information: a rare feed's cursor is pruned once newer items of the agent's other "
            "feeds push it out of PFLEA_SIM_HISTORY; the feed is then read again from its oldest kept",
        )
    )
    h.add(
        Figure(
            "soak",
            "transactions pruned before any page served them (the whole run)",
            float(samples[-1].pruned_unread),
            "transactions",
            target=Target("max", 0, unit="transactions"),
            note="the simulator's count: lost to every reader, because the ingester polled a feed "
            "less often than the feed keeps its items",
        )
    )
