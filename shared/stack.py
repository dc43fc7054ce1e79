"""Where a running ``pflea up`` can be reached, so local commands find it without variables.

``pflea up`` writes ``<PFLEA_DATA_DIR>/stack.json`` with the embedded servers' URLs and removes
it on a clean stop; the CLI falls back to it when DATABASE_URL / NATS_URL are unset
(:func:`services.cli.connections.settings`); services never do. The URLs carry passwords: the
file is 0600 from its first byte, in a folder only its owner may enter.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec

from shared.private_files import write_private


class StackInfo(msgspec.Struct, frozen=True):
    database_url: str  # the read-only role's: what the CLI reads with
    nats_url: str
    pid: int
    owner_database_url: str = ""  # the schema owner's: `pflea migrate`, `pflea projections rebuild`
    # The embedded nats-server's, which `pflea agents` signals to reload its users (None when
    # NATS_URL named a server of its own).
    nats_pid: int | None = None


def stack_file(data_dir: Path) -> Path:
    return Path(data_dir) / "stack.json"


def write_stack(data_dir: Path, info: StackInfo) -> None:
    write_private(stack_file(data_dir), msgspec.json.encode(info))


def read_stack(data_dir: Path) -> StackInfo | None:
    path = stack_file(data_dir)
    try:
        return msgspec.json.decode(path.read_bytes(), type=StackInfo)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def clear_stack(data_dir: Path) -> None:
    with contextlib.suppress(OSError):
        stack_file(data_dir).unlink()
