"""One way to connect to NATS: reconnect forever, to any server NATS_URL names (or the cluster
announces), and log what the connection goes through."""

from __future__ import annotations

import logging

import nats.errors

from shared.nats_headers import Client
from shared.nats_url import parse_nats_url
from shared.unreachable import CONNECT_FAILURES, RepeatedWarnings, describe, redacted_url

log = logging.getLogger(__name__)

RECONNECT_WAIT_S = 0.5


async def connect_nats(url: str, name: str) -> Client:
    """Connected to a server of ``url`` (one, or a comma list of a cluster's), trying them in
    turn every RECONNECT_WAIT_S until one answers (at start too), and again whenever it is lost.

    nats-py calls the error callback on every failed attempt, twice a second while the server is
    away: those become one line naming the server, repeated at most every 30 s with a count.
    """
    nc = Client()
    where = redacted_url(url)
    warnings = RepeatedWarnings(log)

    async def error_cb(exc: Exception) -> None:
        if not nc.is_connected and isinstance(exc, OSError | TimeoutError | nats.errors.NoServersError):
            CONNECT_FAILURES.labels("nats").inc()
            warnings.warning(
                f"NATS at {where} is unreachable ({describe(exc)}); retrying every {RECONNECT_WAIT_S}s"
            )
        else:
            warnings.warning(f"nats error: {describe(exc)}")

    async def disconnected_cb() -> None:
        if nc.is_reconnecting:
            log.warning("NATS at %s disconnected; reconnecting every %ss", where, RECONNECT_WAIT_S)

    async def reconnected_cb() -> None:
        warnings.clear()
        server = nc.connected_url.netloc.rpartition("@")[2] if nc.connected_url else "?"
        log.info("NATS reconnected to %s", server, extra={"url": where})

    await nc.connect(
        **parse_nats_url(url).connect_options(),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=RECONNECT_WAIT_S,  # type: ignore[arg-type]  # an int in its stubs only
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
    )
    if warnings.clear():
        log.info("NATS at %s is reachable", where)
    return nc
