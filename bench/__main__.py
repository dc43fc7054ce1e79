"""``python -m bench [--quick] [--only SCENARIO ...]``: start servers, run, print, record.

A full run writes ``bench/results.json`` and ``bench/results.md``; ``--quick`` or ``--only``
runs write ``bench/results-quick.*`` instead, so the recorded full results stay as they were.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import (
    capacity,
    catchup,
    cluster,
    compare,
    end_to_end,
    explorer,
    importer,
    ingest,
    limits,
    partitions,
    rebuild,
    shards,
    soak,
    startup,
    time_travel,
    writer,
)
from bench.harness import Harness, Sizes
from bench.processes import ForeignLoad
from bench.report import Figure, console_table, machine, write_json, write_markdown
from bench.servers import running_servers
from bench.workload import ORDERS
from shared.service import tune_gc

HERE = Path(__file__).resolve().parent

Scenario = Callable[[Harness], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {
    "limits": limits.run,
    "writer": writer.run,
    "ingest": ingest.run,
    "partitions": partitions.run,
    "catchup": catchup.run,
    "e2e": end_to_end.run,
    "rebuild": rebuild.run,
    "time-travel": time_travel.run,
    "import": importer.run,
    "compare": compare.run,
    "explorer": explorer.run,
    "cluster": cluster.run,
    "capacity": capacity.run,
    "shards": shards.run,
    "soak": soak.run,
    "startup": startup.run,
}
# A figure is compared to limits measured in the same run, so a scenario brings its limits.
REQUIRES = {
    "writer": ["limits"],
    "catchup": ["limits", "writer"],
    "e2e": ["limits"],
    "import": ["limits"],
    "compare": ["limits", "e2e"],
    "capacity": ["limits", "writer", "e2e"],
}
ORDER = [
    "limits",
    "writer",
    "ingest",
    "partitions",
    "catch-up",
    "end-to-end",
    "latency",
    "memory",
    "rebuild",
    "verify",
    "time travel",
    "import",
    "compare",
    "explorer",
    "cluster",
    "capacity",
    "shards",
    "soak",
    "startup",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every scenario")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SCENARIOS),
        metavar="SCENARIO",
        help=f"run only these (repeatable; the limits they need come along): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--order",
        choices=ORDERS,
        default="pages",
        help="order of the pre-filled PFLEA_TX: the ingester's backlog pages (default) or live interleaving",
    )
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy every service process into DIR")
    parser.add_argument(
        "--logs", type=Path, metavar="DIR", help="keep service logs in DIR (default: discarded)"
    )
    parser.add_argument("--out", type=Path, metavar="STEM", help="write STEM.json and STEM.md")
    for f in dataclasses.fields(Sizes):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            metavar="N",
            help=f"default {f.default:,} ({Sizes.quick().__dict__[f.name]:,} with --quick)",
        )
    # The soak's two knobs by their short names (README): --minutes N --rate R.
    parser.add_argument("--minutes", dest="soak_minutes", type=float, metavar="N", help="soak: minutes")
    parser.add_argument("--rate", dest="soak_rate", type=float, metavar="R", help="soak: transactions/s")
    return parser.parse_args(argv)


# Run only when named with --only: minutes of its own, and a figure of sizing, not of the pipeline.
OPT_IN = {"shards", "soak"}


def chosen(only: list[str] | None) -> list[str]:
    if not only:
        return [name for name in SCENARIOS if name not in OPT_IN]
    wanted = {dep for name in only for dep in REQUIRES.get(name, [])} | set(only)
    return [name for name in SCENARIOS if name in wanted]


def sizes_from(args: argparse.Namespace) -> Sizes:
    base = Sizes.quick() if args.quick else Sizes()
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes) if getattr(args, f.name) is not None
    }
    return dataclasses.replace(base, **given)


async def run_all(args: argparse.Namespace, names: list[str], log_dir: Path) -> Harness:
    async with running_servers() as servers:
        h = Harness(servers, sizes_from(args), log_dir, args.profile, args.order)
        for name in names:
            started = time.monotonic()
            print(f"▶ {name} …", flush=True)
            try:
                await SCENARIOS[name](h)
            except Exception as exc:
                traceback.print_exc()
                h.add(Figure(name, "scenario failed", None, "", note=f"{type(exc).__name__}: {exc}"[:500]))
            print(f"  {name} done in {time.monotonic() - started:.0f} s", flush=True)
        return h


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = chosen(args.only)
    partial = args.quick or bool(args.only)
    stem = args.out or HERE / ("results-quick" if partial else "results")
    info = machine()
    load = info["load_avg_at_start"]
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB; load average {load}")
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="pflea-bench-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    foreign = ForeignLoad()
    # SIGTERM stops a run as Ctrl-C does, through every scenario's clean-up: without this, a
    # `kill` left the stack it had started (Postgres, nats-server, every service) running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        tune_gc()  # as the services do, so the limits measured here are not a handicapped baseline
        h = asyncio.run(run_all(args, names, log_dir))
    finally:
        if args.logs is None:
            shutil.rmtree(log_dir, ignore_errors=True)
    seconds = time.monotonic() - started
    figures = sorted(h.figures, key=lambda f: ORDER.index(f.scenario) if f.scenario in ORDER else len(ORDER))
    print()
    print(console_table(figures))
    foreign_share = foreign.share()
    run: dict[str, Any] = {
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "scenarios": names,
        "sizes": dataclasses.asdict(h.sizes),
        "order": h.order,
        "seconds": seconds,
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "foreign_cpu_share": round(foreign_share, 3),
    }
    if foreign_share > 0.05:
        print(f"\nnote: other processes used {foreign_share:.0%} of the machine during the run")
    write_json(stem.with_suffix(".json"), figures, info, run)
    write_markdown(stem.with_suffix(".md"), figures, info, run)
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')} ({seconds:.0f} s)")
    # Missed targets are findings, not failures; a scenario that could not run is.
    return 1 if any(f.name == "scenario failed" for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
