"""docker-compose.cluster.yml: the NATS part as a three-node JetStream cluster, checked without
Docker. Rendered by the real ``docker-compose config`` over docker-compose.yml, and its nodes'
config (deploy/nats/cluster.conf over nats.conf) run on three real nats-servers from the wheel,
logged in to with the URLs compose hands the services."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.ports import free_port
from shared.jetstream import StreamSettings, Topology, declare_streams, ensure_streams
from shared.nats_conn import connect_nats
from shared.nats_url import parse_nats_url
from tests.test_compose import (
    APP_SERVICES,
    COMPOSE_FILE,
    CORE_SERVICES,
    NATS_CONF,
    NATS_USER,
    ROOT,
    Rendered,
    _local_config,
    _mounts,
    _nats_command,
    _wait_until_healthy,
    render,
)

CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"
CLUSTER_CONF = NATS_CONF.parent / "cluster.conf"
NODES = ("nats", "nats-2", "nats-3")
TOPOLOGY = Topology()


@pytest.fixture(scope="module")
def cluster() -> Rendered:
    return render("tools", files=(COMPOSE_FILE, CLUSTER_FILE))


def test_the_cluster_file_adds_two_nodes_to_the_pipeline(cluster: Rendered) -> None:
    assert set(cluster.services) == CORE_SERVICES | {"nats-2", "nats-3", "nats-box", "agents"}
    assert "variable is not set" not in cluster.warnings, cluster.warnings


@pytest.mark.parametrize("node", NODES)
def test_each_node_runs_the_single_nodes_config_plus_routes_with_a_store_of_its_own(
    cluster: Rendered, node: str
) -> None:
    service = cluster.services[node]
    assert service["command"][2].endswith("exec nats-server -c /etc/nats/cluster.conf")
    assert service["environment"]["NATS_NODE"] == node
    assert "/healthz" in " ".join(service["healthcheck"]["test"])
    mounts = _mounts(service)
    assert Path(mounts["/etc/nats/nats.conf"]["source"]) == NATS_CONF
    assert Path(mounts["/etc/nats/cluster.conf"]["source"]) == CLUSTER_CONF
    assert mounts["/data"]["source"] == ("nats-data" if node == "nats" else f"{node}-data")
    assert mounts["/etc/nats/agents"]["source"] == "nats-agents"  # one agents list for all


def test_the_routes_name_every_node_and_the_accounts_are_the_single_nodes() -> None:
    text = CLUSTER_CONF.read_text()
    assert re.search(r'^include "nats.conf"$', text, re.M)
    assert re.findall(r"nats-route://([\w-]+):6222", text) == list(NODES)


@pytest.mark.parametrize("name", ["migrate", *APP_SERVICES])
def test_every_service_gets_all_three_nodes_as_its_own_user_and_r3_streams(
    cluster: Rendered, name: str
) -> None:
    environment = cluster.services[name]["environment"]
    servers = parse_nats_url(environment["NATS_URL"])
    assert servers.servers == tuple(f"nats://{node}:4222" for node in NODES)
    assert servers.user == NATS_USER.get(name, "admin")
    assert environment["PFLEA_STREAM_REPLICAS"] == "3"
    waits_for = cluster.services[name]["depends_on"]
    assert all(waits_for[node]["condition"] == "service_healthy" for node in NODES)


def test_without_the_cluster_file_nats_is_the_single_node_it_was() -> None:
    single = render()
    assert not {"nats-2", "nats-3"} & set(single.services)
    assert single.services["nats"]["command"][2].endswith("-c /etc/nats/nats.conf")
    for name in ("migrate", *APP_SERVICES):
        environment = single.services[name]["environment"]
        assert "PFLEA_STREAM_REPLICAS" not in environment
        assert parse_nats_url(environment["NATS_URL"]).servers == ("nats://nats:4222",)


# --- the nodes' config on real nats-servers ------------------------------------------------


@dataclass
class LocalCluster:
    ports: dict[str, int]

    def url(self, compose_url: str) -> str:
        """A service's NATS_URL with the compose hosts swapped for the local nodes."""
        for node, port in self.ports.items():
            compose_url = compose_url.replace(f"@{node}:4222", f"@127.0.0.1:{port}")
        return compose_url


@pytest.fixture(scope="module")
def local_cluster(cluster: Rendered, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    work = tmp_path_factory.mktemp("compose-cluster")
    ports = {node: (free_port(), free_port(), free_port()) for node in NODES}  # client, monitor, route
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for node, (port, monitor_port, route_port) in ports.items():
            etc = work / node / "etc"
            (etc / "agents").mkdir(parents=True)
            (etc / "nats.conf").write_text(
                _local_config(NATS_CONF.read_text(), work / node / "js", port, monitor_port)
            )
            conf = CLUSTER_CONF.read_text().replace("0.0.0.0:6222", f"127.0.0.1:{route_port}")
            for other, (_, _, other_route) in ports.items():
                conf = conf.replace(f"nats-route://{other}:6222", f"nats-route://127.0.0.1:{other_route}")
            (etc / "cluster.conf").write_text(conf)
            env = {**os.environ, **cluster.services[node]["environment"]}
            with open(work / node / "nats-server.log", "wb") as out:
                procs.append(
                    subprocess.Popen(
                        _nats_command(cluster.services[node]["command"][2], etc),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        for proc, (node, (_, monitor_port, _)) in zip(procs, ports.items(), strict=True):
            # The cluster file's healthcheck: meta leader known, this node current.
            _wait_until_healthy(
                f"http://127.0.0.1:{monitor_port}/healthz", proc, work / node / "nats-server.log", 60
            )
        yield LocalCluster({node: port for node, (port, _, _) in ports.items()})
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def test_migrate_declares_r3_streams_and_each_service_uses_them_through_any_node(
    cluster: Rendered, local_cluster: LocalCluster
) -> None:
    admin = await connect_nats(
        local_cluster.url(cluster.services["migrate"]["environment"]["NATS_URL"]), "admin"
    )
    ingester = await connect_nats(
        local_cluster.url(cluster.services["ingester"]["environment"]["NATS_URL"]), "ingester"
    )
    try:
        await declare_streams(admin.jetstream(), TOPOLOGY, 120.0, StreamSettings(replicas=3))
        info = await admin.jetstream().stream_info(TOPOLOGY.tx_stream)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        js = ingester.jetstream()
        await ensure_streams(js, TOPOLOGY, 120.0, StreamSettings(replicas=3))  # they exist: only looked up
        ack = await js.publish(TOPOLOGY.tx_subject("agent-c1"), b"{}", timeout=10)
        assert ack.stream == TOPOLOGY.tx_stream
    finally:
        await admin.close()
        await ingester.close()
