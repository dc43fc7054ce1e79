"""NATS_URL names one server or a cluster's, comma-separated as the ``nats`` CLI takes them."""

from __future__ import annotations

import pytest

from shared.db import refuse_default_password
from shared.jetstream import StreamSettings, Topology
from shared.nats_auth import user_url
from shared.nats_url import parse_nats_url, without_login
from shared.settings import SettingsError, load_settings
from shared.unreachable import redacted_url

CLUSTER = "nats://writer:s3cret@a:4222, nats://b:4223 ,c"


def test_several_servers_share_the_one_login_given_on_any_of_them() -> None:
    servers = parse_nats_url(CLUSTER)
    assert servers.servers == ("nats://a:4222", "nats://b:4223", "nats://c:4222")
    assert servers.connect_options() == {
        "servers": ["nats://a:4222", "nats://b:4223", "nats://c:4222"],
        "user": "writer",
        "password": "s3cret",
    }
    assert "s3cret" not in repr(servers)


def test_a_user_without_a_password_is_a_token() -> None:
    options = parse_nats_url("nats://t0ken@a:4222,nats://b:4222").connect_options()
    assert options == {"servers": ["nats://a:4222", "nats://b:4222"], "token": "t0ken"}


def test_a_login_goes_onto_every_server_and_comes_off_every_one() -> None:
    assert user_url("nats://a:4222,nats://op:x@b:4222", "admin", "p/w") == (
        "nats://admin:p%2Fw@a:4222,nats://admin:p%2Fw@b:4222"
    )
    assert parse_nats_url(user_url("nats://a:1,nats://b:2", "admin", "p/w")).password == "p/w"
    assert without_login(CLUSTER) == "nats://a:4222,nats://b:4223,nats://c:4222"
    assert redacted_url(CLUSTER) == "nats://writer:***@a:4222,nats://b:4223,c"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("nats://u:p@a:4222,nats://v:q@b:4222", "different users"),
        ("http://a:4222", "is not"),
        ("nats://a:port", "is not a server address"),
        (" , ", "names no server"),
        ("nats://a:4222,ws://b:80", "mixes websocket"),
    ],
)
def test_a_nats_url_that_names_no_cluster_is_refused_naming_the_variable(url: str, why: str) -> None:
    with pytest.raises(SettingsError, match=why) as info:
        load_settings({"NATS_URL": url})
    assert info.value.variable == "NATS_URL"
    assert "p@" not in str(info.value) and "q@" not in str(info.value)


def test_an_old_default_password_is_refused_on_any_server_of_the_list() -> None:
    with pytest.raises(SettingsError):
        refuse_default_password("nats://a:4222,nats://writer:writer-dev@b:4222", "NATS_URL", allowed=False)


@pytest.mark.parametrize(("raw", "replicas"), [(None, 1), ("3", 3), ("5", 5)])
def test_streams_keep_as_many_copies_as_pflea_stream_replicas_says(raw: str | None, replicas: int) -> None:
    settings = load_settings({} if raw is None else {"PFLEA_STREAM_REPLICAS": raw})
    assert settings.stream_replicas == replicas
    configs = Topology().stream_configs(60.0, StreamSettings.of(settings))
    assert [c.num_replicas for c in configs] == [replicas, replicas]


@pytest.mark.parametrize("raw", ["0", "6", "three", "-1"])
def test_a_replica_count_jetstream_cannot_keep_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"PFLEA_STREAM_REPLICAS": raw})
    assert info.value.variable == "PFLEA_STREAM_REPLICAS"
