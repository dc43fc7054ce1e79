"""Figures, their targets, and the three ways they are shown: console table, JSON, markdown."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psutil


@dataclass(frozen=True)
class Target:
    """``value`` (or its ratio to the limit, ``on="ratio"``) must be at least/most ``threshold``."""

    bound: Literal["min", "max"]
    threshold: float
    on: Literal["value", "ratio"] = "value"
    unit: str = ""

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        subject = ratio if self.on == "ratio" else value
        if subject is None:
            return None
        return subject >= self.threshold if self.bound == "min" else subject <= self.threshold

    def __str__(self) -> str:
        sign = "≥" if self.bound == "min" else "≤"
        if self.on == "ratio":
            return f"{sign} {self.threshold:g} × limit"
        return f"{sign} {_number(self.threshold)} {self.unit}".rstrip()


@dataclass
class Figure:
    scenario: str
    name: str
    value: float | None  # None: not measured (see ``note``)
    unit: str
    limit_name: str | None = None  # the limit figure this one is compared to (same run)
    limit_value: float | None = None
    target: Target | None = None
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.limit_value:
            return None
        return self.value / self.limit_value

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "limit" if self.scenario == "limits" else "info"
        met = self.target.met(self.value, self.ratio)
        return "n/a" if met is None else ("pass" if met else "MISS")

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = str(self.target) if self.target else None
        data["ratio"] = self.ratio
        data["verdict"] = self.verdict
        return data


def _number(x: float | None) -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:,.1f}"
    return f"{x:,.2f}"


COLUMNS = ("scenario", "figure", "value", "limit (same run)", "ratio", "target", "result")


def rows(figures: list[Figure]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for f in figures:
        value = "not available" if f.value is None else f"{_number(f.value)} {f.unit}"
        limit = f"{f.limit_name}: {_number(f.limit_value)}" if f.limit_name else ""
        ratio = f"{f.ratio:.2f}×" if f.ratio is not None else ""
        out.append((f.scenario, f.name, value, limit, ratio, str(f.target or ""), f.verdict))
    return out


def console_table(figures: list[Figure]) -> str:
    table = [COLUMNS, *rows(figures)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  [{f.scenario} / {f.name}] {f.note}" for f in figures if f.note]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def machine() -> dict[str, Any]:
    from bench.servers import server_versions

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        **server_versions(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(path: Path, figures: list[Figure], info: dict[str, Any], run: dict[str, Any]) -> None:
    body = {"machine": info, "run": run, "figures": [f.as_json() for f in figures]}
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")


def write_markdown(path: Path, figures: list[Figure], info: dict[str, Any], run: dict[str, Any]) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{' '.join(['python -m bench', run.get('argv', '')]).strip()}` on {info['date']}, "
        f"order `{run.get('order', 'pages')}`, sizes: "
        + ", ".join(f"{k} {v:,}" for k, v in run.get("sizes", {}).items())
        + ".",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {info['cpu']} |",
        f"| cores | {info['cores']} |",
        f"| RAM | {info['ram_gb']} GB |",
        f"| OS | {info['os']} |",
        f"| Python | {info['python']} |",
        f"| Postgres | {info['postgres']} (embedded, durable: fsync on, synchronous_commit on) |",
        f"| nats-server | {info['nats_server']} (JetStream file store, sync_interval always) |",
        f"| load average at start | {', '.join(map(str, info['load_avg_at_start']))} |",
        f"| load average at end (the bench's own processes included) | "
        f"{', '.join(map(str, run.get('load_avg_at_end', [])))} |",
        f"| CPU used by other processes during the run | {run.get('foreign_cpu_share', 0):.0%} "
        "of the machine (system-wide busy CPU minus the bench's process tree) |",
        f"| wall time of the run | {run.get('seconds', 0):.0f} s |",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows(figures)]
    notes = [f"- **{f.scenario} / {f.name}**: {f.note}" for f in figures if f.note]
    if notes:
        lines += ["", "Notes:", "", *notes]
    path.write_text("\n".join(lines) + "\n")
