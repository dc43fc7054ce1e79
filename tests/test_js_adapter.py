"""``shared/js_adapter.py`` reads two private attributes of nats-py; these tests fail against a
real nats-server if an upgrade renames them or changes what they mean."""

from __future__ import annotations

import nats
import pytest

from shared.jetstream import Topology, pull_consumer_config
from shared.js_adapter import NatsPyChanged, api_prefix, connection


async def test_the_adapter_finds_the_connection_a_jetstream_context_uses(js_streams: nats.NATS) -> None:
    js = js_streams.jetstream()
    assert connection(js) is js_streams
    assert "reconnects" in connection(js).stats  # what publish_in_order watches


async def test_a_pull_request_sent_under_the_adapters_prefix_is_served_by_the_consumer(
    js_streams: nats.NATS, topology: Topology
) -> None:
    """What shared.consumer.PullStream does, once: the prefix must name the JetStream API."""
    js = js_streams.jetstream()
    durable = "adapter-probe"
    config = pull_consumer_config(durable, topology.tx_filter, ack_wait_s=30, max_deliver=1)
    await js.add_consumer(topology.tx_stream, config)
    await js.publish(topology.tx_subject("agent-1"), b"probe")
    next_subject = f"{api_prefix(js)}.CONSUMER.MSG.NEXT.{topology.tx_stream}.{durable}"
    nc = connection(js)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(next_subject, b'{"batch": 1, "expires": 2000000000}', reply=inbox)
    delivered = await sub.next_msg(timeout=5)
    await sub.unsubscribe()
    assert (delivered.subject, delivered.data) == (topology.tx_subject("agent-1"), b"probe")


def test_a_domain_is_part_of_the_api_prefix() -> None:
    assert api_prefix(nats.NATS().jetstream()) == "$JS.API"
    assert api_prefix(nats.NATS().jetstream(domain="hub")) == "$JS.hub.API"


def test_an_attribute_gone_from_nats_py_is_reported_as_such() -> None:
    js = nats.NATS().jetstream()
    del js._nc, js._prefix  # what an upstream rename would look like
    with pytest.raises(NatsPyChanged, match="JetStreamContext._nc .*shared/js_adapter.py"):
        connection(js)
    with pytest.raises(NatsPyChanged, match="JetStreamContext._prefix .*shared/js_adapter.py"):
        api_prefix(js)
