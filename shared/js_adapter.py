"""The one place that reads nats-py's private attributes: a JetStream context's connection and
API prefix.

nats-py (2.16) gives a ``JetStreamContext`` no public handle to either. :mod:`shared.consumer`
needs both to keep its own pull request open (``<prefix>.CONSUMER.MSG.NEXT.<stream>.<durable>``,
on the context's connection), and the publishers (``publish_in_order``, ``publish_atomic``)
publish on it and watch its reconnect count. Passing the connection alongside every context
would spread the same knowledge over every service. ``tests/test_js_adapter.py`` runs these
against a real nats-server, so an upstream rename or change of meaning fails there, naming this
module, not deep in a consumer loop.
"""

from __future__ import annotations

from importlib.metadata import version

from nats.aio.client import Client
from nats.js import JetStreamContext


class NatsPyChanged(RuntimeError):
    """nats-py no longer has what this module reads: adapt it to the installed version."""

    def __init__(self, what: str) -> None:
        super().__init__(f"nats-py {version('nats-py')}: {what}; update shared/js_adapter.py")


def connection(js: JetStreamContext) -> Client:
    """The connection ``js`` publishes and subscribes on."""
    nc = getattr(js, "_nc", None)
    if not isinstance(nc, Client):
        raise NatsPyChanged(f"JetStreamContext._nc is {type(nc).__name__}, not a Client")
    return nc


def api_prefix(js: JetStreamContext) -> str:
    """The JetStream API subject prefix of ``js``: ``$JS.API``, or ``$JS.<domain>.API``."""
    prefix = getattr(js, "_prefix", None)
    if not isinstance(prefix, str) or not prefix:
        raise NatsPyChanged(f"JetStreamContext._prefix is {prefix!r}, not an API subject prefix")
    return prefix
