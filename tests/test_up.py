"""The README's run command, black-box: it starts, fills the read models, stops, resumes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import nats
import pytest

from devstack.ports import free_port
from devstack.processes import wait_until
from shared.nats_auth import user_url
from shared.stack import read_stack
from tests.support import REPO

PFLEA = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "pflea"


def test_make_up_runs_exactly_pflea_up() -> None:
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(REPO), "up"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert dry.stdout.strip().splitlines()[-1].endswith("/bin/pflea up")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="pflea-up-"))
    base.chmod(0o755)  # as root, the embedded Postgres runs as its own user and must enter it
    yield base / "data"
    shutil.rmtree(base, ignore_errors=True)


def _start(data_dir: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    env.pop("DATABASE_URL", None)
    env.pop("NATS_URL", None)
    env.update(
        PFLEA_DATA_DIR=str(data_dir),
        PFLEA_EMBEDDED_PG_PORT=str(free_port()),
        PFLEA_EMBEDDED_NATS_PORT=str(free_port()),
        PFLEA_SIM_PORT=str(free_port()),
        PFLEA_SIM_AGENTS="8",
        PFLEA_SIM_RATE="300",
        PFLEA_METRICS_BASE_PORT="0",
        PFLEA_WEB_PORT=str(free_port()),
    )
    with open(out, "ab") as log:
        return subprocess.Popen(
            [str(PFLEA), "up", "--status-every", "1"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )


async def _populated(url: str) -> dict[str, int] | None:
    conn = await asyncpg.connect(url)
    try:
        counts = {
            t: await conn.fetchval(f"SELECT count(*) FROM {t}")
            for t in ("events", "balances", "pnl", "portfolio", "leaderboard")
        }
        return counts if all(counts.values()) else None
    finally:
        await conn.close()


async def _no_duplicates(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            # Ingested events (the one an agent's command recorded has no tx_id).
            """SELECT count(*) AS n, count(DISTINCT event_id) AS ids,
                      count(DISTINCT data->>'tx_id') AS txs FROM events
               WHERE metadata->>'command' IS NULL"""
        )
        assert row["n"] == row["ids"] == row["txs"], f"duplicates after resume: {dict(row)}"
    finally:
        await conn.close()


async def _forbidden_publish_is_refused(data_dir: Path, operator_url: str) -> None:
    """The embedded NATS has per-service users: the ingester may not publish events."""
    assert urlsplit(operator_url).username == "operator"  # what the CLI finds in stack.json
    passwords = json.loads((data_dir / "nats" / "users.json").read_text())
    url = user_url(operator_url, "ingester", passwords["ingester"])
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False)
    try:
        await nc.publish("pflea.events.agent-0001.FundsDeposited", b'{"amount": "1000000"}')
        await nc.flush()
        await wait_until(lambda: errors, 10, "a permissions violation")
        assert "permissions violation" in str(errors[0]).lower()
    finally:
        await nc.close()
    with pytest.raises(nats.errors.Error):
        await nats.connect(
            user_url(operator_url, "ingester", "wrong"), allow_reconnect=False, max_reconnect_attempts=0
        )


def _secrets(data_dir: Path) -> dict[str, str]:
    """Every password `pflea up` made, by where it is kept."""
    found = {
        f"postgres {role}": pw
        for role, pw in json.loads((data_dir / "secrets" / "postgres.json").read_text()).items()
    }
    found["postgres superuser"] = (data_dir / "postgres" / "superuser.password").read_text().strip()
    users = json.loads((data_dir / "nats" / "users.json").read_text())
    found.update({f"nats {user}": pw for user, pw in users.items()})
    found["web operator token"] = (data_dir / "secrets" / "web-operator-token").read_text().strip()
    assert len(set(found.values())) == len(found), "two roles or users share a password"
    return found


def _children(pid: int) -> dict[int, str]:
    """The processes ``pid`` started, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found


async def _secrets_stay_private(data_dir: Path, out: Path, pid: int, pg_port: int) -> None:
    """No password on screen, in a log, in a file others may read, or in another service's
    environment; Postgres asks everyone for one."""
    secrets = _secrets(data_dir)
    for name, secret in secrets.items():
        assert secret not in out.read_text(), f"pflea up printed the {name} password"
        for log in (data_dir / "logs").iterdir():
            assert secret not in log.read_text(errors="replace"), f"{log.name} holds the {name} password"
    assert stat.S_IMODE((data_dir / "secrets").stat().st_mode) == 0o700
    assert stat.S_IMODE(data_dir.stat().st_mode) & 0o066 == 0
    for path in data_dir.rglob("*"):
        try:
            text = path.read_text(errors="replace") if path.is_file() else ""
        except OSError:
            continue  # the Postgres cluster's own files, when it runs as another OS user
        holds = [name for name, secret in secrets.items() if secret in text]
        if holds:
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (
                f"{path} holds {holds} and others may read it"
            )
    roles = {
        "services.writer": "pflea_writer",
        "services.relay": "pflea_writer",
        "services.ingester": "pflea_ingester",
        "services.web": "pflea_reader",
    }
    services = {p: cmd for p, cmd in _children(pid).items() if "-m services." in cmd}
    assert len(services) == 9, services
    for child, cmd in services.items():
        environ = dict(
            item.split("=", 1)
            for item in (Path(f"/proc/{child}/environ").read_bytes().decode().split("\0"))
            if "=" in item
        )
        module = cmd.split("-m ", 1)[1].split()[0]
        role = roles.get(module, "pflea_projector" if module == "services.projectors" else None)
        url = urlsplit(environ.get("DATABASE_URL", ""))
        assert url.username == role, f"{cmd} logs in to Postgres as {url.username}"
        mine = {
            url.password,
            urlsplit(environ.get("NATS_URL", "")).password,
            environ.get("PFLEA_WEB_OPERATOR_TOKEN"),
        }
        others = {
            name
            for name, secret in secrets.items()
            if secret not in mine and secret in "\0".join(environ.values())
        }
        assert not others, f"{cmd} holds the {others} passwords"
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pg_port}/postgres", password="")


async def _the_explorer_answers_at_the_printed_url(data_dir: Path, printed: str) -> None:
    match = re.search(r"explorer .*?: (http://127\.0\.0\.1:\d+/)", printed)
    assert match, f"pflea up did not print the explorer's URL:\n{printed}"
    assert str(data_dir / "secrets" / "web-operator-token") in printed
    token = (data_dir / "secrets" / "web-operator-token").read_text().strip()

    async def leaderboard() -> str | None:
        try:
            async with (
                aiohttp.ClientSession() as client,
                client.get(match.group(1), headers={"Authorization": f"Bearer {token}"}) as r,
            ):
                return await r.text() if r.status == 200 else None
        except aiohttp.ClientError:
            return None

    page = await wait_until(leaderboard, 60, "the explorer's leaderboard", 0.5)
    assert '<section class="board"' in page


def _pflea(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI beside a running `pflea up`: it finds the stack through the data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    env.pop("DATABASE_URL", None)
    env.pop("NATS_URL", None)
    env["PFLEA_DATA_DIR"] = str(data_dir)
    return subprocess.run([str(PFLEA), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def _an_agent_added_to_the_running_stack_sends_its_commands(data_dir: Path) -> None:
    added = _pflea(data_dir, "agents", "add", "newcomer")
    assert added.returncode == 0, added.stderr
    assert "reloaded" in added.stdout
    password = json.loads((data_dir / "agents" / "newcomer.json").read_text())["nats_password"]
    assert password not in added.stdout + added.stderr
    sent = _pflea(data_dir, "agent", "newcomer", "register", "--json")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["status"] == "accepted"  # the writer checked who sent it
    asyncio.run(
        _its_sql_login_reads_its_own_rows_only(
            json.loads((data_dir / "agents" / "newcomer.json").read_text())
        )
    )


async def _its_sql_login_reads_its_own_rows_only(credentials: dict[str, str]) -> None:
    assert credentials["nats_password"] not in credentials["database_url"]
    conn = await asyncpg.connect(credentials["database_url"])
    try:
        streams = {r["stream_id"] for r in await conn.fetch("SELECT DISTINCT stream_id FROM events")}
        assert streams == {"newcomer"}, streams
        assert await conn.fetchval("SELECT count(*) FROM leaderboard") > 0  # public
    finally:
        await conn.close()


async def _stop(proc: subprocess.Popen[bytes], out: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    for _ in range(600):
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.1)
    assert proc.poll() == 0, f"pflea up did not stop cleanly:\n{out.read_text()[-3000:]}"


def _logged(log: Path, msg: str) -> set[str]:
    """The services that logged ``msg`` in ``log`` (JSON lines)."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return {line["service"] for line in lines if line.get("msg") == msg}


async def test_up_fills_the_read_models_stops_cleanly_and_resumes(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "up.out"
    proc = _start(data_dir, out)
    try:
        stack = await wait_until(lambda: read_stack(data_dir), 90, "stack.json")
        first = await wait_until(lambda: _populated(stack.database_url), 90, "populated read models", 0.5)
        await wait_until(lambda: "stored" in out.read_text(), 30, "a status line")
        text = out.read_text()
        assert "SELECT * FROM leaderboard" in text and "pflea_reader" in text, "no psql line for the user"
        await _secrets_stay_private(data_dir, out, proc.pid, urlsplit(stack.database_url).port or 0)
        await _the_explorer_answers_at_the_printed_url(data_dir, text)
        await _forbidden_publish_is_refused(data_dir, stack.nats_url)
        await asyncio.to_thread(_an_agent_added_to_the_running_stack_sends_its_commands, data_dir)
        await _stop(proc, out)
        assert read_stack(data_dir) is None
        # The simulator's epoch: the restarted one serves what the first served, cursors included.
        epoch = (data_dir / "simulator.json").read_bytes()
        proc = _start(data_dir, out)
        stack = await wait_until(lambda: read_stack(data_dir), 90, "stack.json again")

        async def grew() -> bool:
            counts = await _populated(stack.database_url)
            return bool(counts) and counts["events"] > first["events"] + 500

        await wait_until(grew, 90, "ingestion resumed", 0.5)
        await _no_duplicates(stack.database_url)
        assert (data_dir / "simulator.json").read_bytes() == epoch
        assert "unknown_since" not in (data_dir / "logs" / "ingester.log").read_text()
        # The relay is a service of its own; the writer only appends and answers commands.
        assert _logged(data_dir / "logs" / "relay.log", "relaying") == {"relay"}
        assert _logged(data_dir / "logs" / "writer.log", "relaying") == set()
        await _stop(proc, out)
    finally:
        if proc.poll() is None:
            proc.kill()
