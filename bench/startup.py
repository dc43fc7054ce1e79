"""Start-up: from ``make up`` to the first stored event, as a new user meets it.

``make up`` is run in a private temporary data folder (``PFLEA_DATA_DIR``) with free ports, on
the venv ``make setup`` left (warm: nothing to install). The clock starts when ``make`` is
started and stops when an event is seen in the stack's ``events`` table (polled every 20 ms as
``pflea_reader``, through the ``stack.json`` that ``pflea up`` writes). Two starts are measured:

- **first**: a fresh data folder, so the embedded Postgres runs ``initdb`` and the migrations,
  and NATS creates its streams;
- **again**: the same folder after a clean stop (SIGTERM), the way a user starts it the next day;
  the clock stops at the first event recorded after the restart began.

Target (issue 17): the first stored event within 5 s on a warm venv. The bench's own servers are
not used: ``make up`` brings its embedded ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from bench.harness import Harness
from bench.report import Figure, Target
from devstack.ports import free_port
from shared.stack import read_stack

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 5.0
GIVE_UP_S = 120.0
NEWER = "SELECT EXISTS (SELECT 1 FROM events WHERE recorded_at > $1)"


async def _first_event_after(
    data_dir: Path, proc: subprocess.Popen[bytes], started: float, since: datetime
) -> float:
    """Seconds from ``started`` until the stack stores an event recorded after ``since``."""
    while time.monotonic() - started < GIVE_UP_S:
        if proc.poll() is not None:
            raise RuntimeError(f"make up exited ({proc.returncode}) before an event was stored")
        stack = read_stack(data_dir)
        if stack is not None:
            try:
                conn = await asyncpg.connect(stack.database_url, timeout=2)
                try:
                    while time.monotonic() - started < GIVE_UP_S:
                        # No table yet (migrations running) or no new event: look again.
                        with contextlib.suppress(asyncpg.UndefinedTableError):
                            if await conn.fetchval(NEWER, since):
                                return time.monotonic() - started
                        await asyncio.sleep(0.02)
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass  # not up yet, or restarting: connect again
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no event stored within {GIVE_UP_S:.0f} s of make up (logs: {data_dir / 'logs'})")


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    for name in ("DATABASE_URL", "NATS_URL"):
        env.pop(name, None)
    return env | {
        "PFLEA_DATA_DIR": str(data_dir),
        "PFLEA_EMBEDDED_PG_PORT": str(free_port()),
        "PFLEA_EMBEDDED_NATS_PORT": str(free_port()),
        "PFLEA_SIM_PORT": str(free_port()),
        "PFLEA_WEB_PORT": str(free_port()),
        "PFLEA_METRICS_BASE_PORT": "0",
    }


async def _start(data_dir: Path, env: dict[str, str], out: Path) -> float:
    since = datetime.now(UTC)
    with open(out, "ab") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            ["make", "-s", "up"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        return await _first_event_after(data_dir, proc, started, since)
    finally:
        await _stop(proc)


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to make and ``pflea up`` (a clean stop, as Ctrl-C does); SIGKILL after 120 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, 120)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait)


async def run(h: Harness) -> None:
    with tempfile.TemporaryDirectory(prefix="pflea-startup-") as tmp:
        data_dir = Path(tmp) / "data"
        env = _env(data_dir)
        out = h.log_dir / "startup.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        # The venv warm, as the target says: anything `make setup` would still do happens now.
        subprocess.run(["make", "-s", "setup"], cwd=REPO, check=True, capture_output=True)
        first_s = await _start(data_dir, env, out)
        again_s = await _start(data_dir, env, out)
    for name, seconds, note in (
        ("first stored event after make up, a fresh data folder", first_s, "initdb, migrations, streams"),
        ("first stored event after make up, again", again_s, "the data folder of the run before"),
    ):
        h.add(
            Figure(
                "startup",
                f"{name} (s)",
                seconds,
                "s",
                target=Target("max", TARGET_S, unit="s"),
                note=f"{note}; make -s up on a warm venv, clock from make's start; output in {out}",
            )
        )
