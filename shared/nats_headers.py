"""Reading a NATS message's header block: nats-py's rules, at a quarter of its cost.

Every PFLEA_EVENTS message carries its event's envelope in a dozen headers (``shared.wire``), and
nats-py 2.16 parses them line by line in bytes, decoding each name and value apart and testing
each name's characters for whitespace with a generator: a projector spent ~35% of its CPU there
in the end-to-end bench (py-spy, 2026-12-04). :func:`parse_header_block` gives the same mapping
for any block (the tests hold it to nats-py's own parser on well-formed and malformed blocks):
a block that is all ASCII, as every header this project writes is, is decoded once and split as
text; anything else is read line by line as nats-py reads it.

:class:`Client` is nats-py's client with this parser: what :func:`shared.nats_conn.connect_nats`
makes. nats-py 2.16 calls ``self._parse_header_lines`` (a static method of its client) for every
message with headers, unless the optional ``fast_mail_parser`` is installed; a version that
parses elsewhere ignores the override (a test notices, so it can be dropped).
"""

from __future__ import annotations

from nats.aio.client import Client as _NatsClient

_WHITESPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips; str.strip() strips more


def parse_header_block(raw: bytes) -> dict[str, str]:
    """``Name: Value`` lines (CRLF-separated) as nats-py reads them: names and values stripped,
    a line without a colon, a name that is not ASCII or has whitespace inside skipped, a value
    decoded as UTF-8 (U+FFFD for what is not), the last of a repeated name kept."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return _parse_bytes(raw)
    out: dict[str, str] = {}
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip(_WHITESPACE)
        if key and key.split() != [key]:  # str.split() splits on exactly what isspace() is
            continue
        out[key] = value.strip(_WHITESPACE)
    return out


def _parse_bytes(raw: bytes) -> dict[str, str]:
    """The same rules on a block with non-ASCII bytes, a line at a time."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if key and key.split() != [key]:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


class Client(_NatsClient):
    """nats-py's client, reading header blocks with :func:`parse_header_block`."""

    _parse_header_lines = staticmethod(parse_header_block)
