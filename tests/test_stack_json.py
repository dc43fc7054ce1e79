"""Only the CLI finds a running ``pflea up`` through ``.pflea/stack.json``; a service never does.

A service started without DATABASE_URL in a folder that happens to hold a stack.json (a
developer's checkout, a stale one left by a killed ``pflea up``) must refuse to start, naming
the variable, rather than write to whatever servers that file names.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import msgspec
import nats
import pytest

from services.cli.connections import settings as cli_settings
from services.cli.connections import with_running_stack
from shared.db import READER_ROLE, role_dsn
from shared.settings import Settings, load_settings
from shared.stack import StackInfo, write_stack
from tests.conftest import SERVICE_PASSWORD

SERVICE_EXIT_S = 30.0  # a deadline for the refusal; it comes at start-up


def _folder_with_stack(folder: Path, database_url: str, nats_url: str) -> Path:
    data_dir = folder / ".pflea"
    data_dir.mkdir()
    write_stack(data_dir, StackInfo(database_url, nats_url, os.getpid()))
    return folder


def _env_without_urls(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    env.pop("DATABASE_URL", None)
    env.pop("NATS_URL", None)
    env.update(
        PFLEA_NAMESPACE=settings.namespace,
        PYTHONUNBUFFERED="1",
    )
    return env


async def _beside_a_stack_json(
    settings: Settings, tmp_path: Path, module: str, *args: str
) -> asyncio.subprocess.Process:
    """``python -m module args`` without DATABASE_URL / NATS_URL, in a folder whose stack.json
    names this test's live servers (Postgres as the reader)."""
    reader = role_dsn(settings.database_url, READER_ROLE, SERVICE_PASSWORD)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=_folder_with_stack(tmp_path, reader, settings.nats_url),
        env=_env_without_urls(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def test_the_settings_loader_never_reads_a_stack_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_folder_with_stack(tmp_path, "postgresql://stack/pflea", "nats://stack:4222"))
    settings = load_settings({})
    assert (settings.database_url, settings.nats_url) == ("", "")


def test_the_cli_takes_what_the_environment_leaves_unset_from_the_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_folder_with_stack(tmp_path, "postgresql://stack/pflea", "nats://stack:4222"))
    for variable in ("DATABASE_URL", "NATS_URL", "PFLEA_DATA_DIR"):
        monkeypatch.delenv(variable, raising=False)
    assert (cli_settings().database_url, cli_settings().nats_url) == (
        "postgresql://stack/pflea",
        "nats://stack:4222",
    )
    mine = with_running_stack(load_settings({"DATABASE_URL": "postgresql://mine/pflea"}))
    assert (mine.database_url, mine.nats_url) == ("postgresql://mine/pflea", "nats://stack:4222")


async def test_a_service_without_database_url_beside_a_stack_json_refuses_to_start(
    settings: Settings, tmp_path: Path
) -> None:
    # The stack.json names live servers: a service that read it would start against them.
    proc = await _beside_a_stack_json(settings, tmp_path, "services.writer")
    try:
        _, err = await asyncio.wait_for(proc.communicate(), SERVICE_EXIT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the writer did not refuse to start: it used the servers in .pflea/stack.json")
    assert proc.returncode == 2, err.decode()
    assert "DATABASE_URL: must be set" in err.decode()


async def test_the_cli_reaches_the_servers_a_stack_json_names(
    settings: Settings, js_streams: nats.NATS, tmp_path: Path
) -> None:
    proc = await _beside_a_stack_json(settings, tmp_path, "services.cli", "status", "--json")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    report = msgspec.json.decode(out)
    # Both answers come from the servers: NATS knows this test's streams, Postgres its projections.
    assert {s["stream"]: s["messages"] for s in report["streams"]} == {
        f"{settings.namespace.upper()}_TX": 0,
        f"{settings.namespace.upper()}_EVENTS": 0,
    }
    assert {p["projection"] for p in report["projections"]} == {"balance", "pnl", "portfolio", "leaderboard"}


def test_stack_json_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """It holds URLs with passwords: 0600 from its first byte, also when it is rewritten."""
    for _ in range(2):
        write_stack(tmp_path, StackInfo("postgresql://r:secret@h/db", "nats://u:secret@h:4222", 1))
        assert stat.S_IMODE((tmp_path / "stack.json").stat().st_mode) == 0o600
