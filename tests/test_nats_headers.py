"""The header parser every service's NATS client uses (shared/nats_headers.py): the mapping
nats-py's own parser gives, for well-formed and malformed blocks, and through a real server."""

from __future__ import annotations

import asyncio
import inspect
import random

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from shared.nats_conn import connect_nats
from shared.nats_headers import Client, parse_header_block

nats_parse = NatsClient._parse_header_lines

EVENT_BLOCK = (
    b"Pflea-Event-Id: 0b6c4a9e-3f0e-4d52-9b8f-1a2b3c4d5e6f\r\nPflea-Stream-Id: agent-0001\r\n"
    b"Pflea-Stream-Version: 1234\r\nPflea-Position: 987654\r\nPflea-Event-Type: BetPlaced\r\n"
    b"Pflea-Occurred-At: 2026-12-04T20:00:00.123456+00:00\r\nPflea-Schema-Version: 1\r\n"
    b"Nats-Batch-Id: 0123456789abcdef\r\nNats-Batch-Sequence: 17\r\n\r\n"
)

CASES = [
    EVENT_BLOCK,
    b"",
    b"\r\n",
    b"Name:Value\r\n",  # no space after the colon
    b"Name:\tValue \r\n",  # a tab after it, a space at the end
    b"Name: a: b\r\n",  # a colon inside the value
    b"no colon here\r\nName: v\r\n",
    b"Bad Name: v\r\nGood: w\r\n",  # whitespace inside a name: skipped
    b"\x1cName: v\r\n",  # str.isspace() whitespace that bytes.strip() keeps: skipped
    b"Name: v\x1c\r\n",  # ... kept at the end of a value
    b" Name : v\r\n",  # whitespace around a name: stripped
    b": empty name\r\n",
    b"Name: first\r\nName: second\r\n",  # the last one wins
    b"Name: caf\xc3\xa9\r\n",  # UTF-8 in a value
    b"Caf\xc3\xa9: v\r\nName: w\r\n",  # non-ASCII name: skipped
    b"Name: \xff\xfe\r\n",  # not UTF-8: replaced
    b"Name: v\nOther: w\r\n",  # a bare LF is not a line break
    b"Name: \x0bv\x0c\r\n",
]


@pytest.mark.parametrize("raw", CASES)
def test_the_same_mapping_as_nats_py(raw: bytes) -> None:
    assert parse_header_block(raw) == nats_parse(raw)


def test_the_same_mapping_for_random_blocks() -> None:
    """ASCII and not: both of the parser's paths, against nats-py's."""
    rng = random.Random(20261204)
    pieces = [
        b"A",
        b"b",
        b"-",
        b":",
        b": ",
        b"\r\n",
        b" ",
        b"\t",
        b"\x1c",
        b"\x0b",
        b"\xc3\xa9",
        b"\xff",
        b"\n",
        b"\r",
    ]
    for _ in range(5_000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 24)))
        assert parse_header_block(raw) == nats_parse(raw), raw


def test_nats_py_still_reads_headers_through_the_method_it_replaces() -> None:
    """An upgrade of nats-py that parses elsewhere would leave the client a plain one."""
    assert "_parse_header_lines" in inspect.getsource(NatsClient._process_headers)
    assert Client._parse_header_lines is parse_header_block


async def test_headers_through_a_real_server_read_as_nats_py_reads_them(nats_url: str) -> None:
    sent = {
        "Pflea-Position": "42",
        "Pflea-Event-Type": "BetWon",
        "Pflea-Occurred-At": "2026-12-04T20:00:00+00:00",
        "Note": "café au lait",
    }
    ours = await connect_nats(nats_url, "test-headers")
    plain = await nats.connect(nats_url)
    try:
        assert isinstance(ours, Client)
        got: dict[str, asyncio.Future[dict[str, str]]] = {}
        subs = []
        for name, nc in (("ours", ours), ("plain", plain)):
            got[name] = asyncio.get_running_loop().create_future()

            async def take(msg: Msg, into: asyncio.Future[dict[str, str]] = got[name]) -> None:
                if not into.done():
                    into.set_result(dict(msg.headers or {}))

            subs.append(await nc.subscribe("test.headers", cb=take))
            await nc.flush()
        await plain.publish("test.headers", b"{}", headers=sent)
        received = {name: await asyncio.wait_for(f, 5) for name, f in got.items()}
        assert received["ours"] == received["plain"] == sent
    finally:
        await ours.close()
        await plain.close()
