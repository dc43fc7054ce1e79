"""Secrets on disk: folders only their owner may enter, files only their owner may read.

One way to write them for everything that keeps a secret in the data folder (``pflea up``'s
passwords, stack.json, agents' credentials and the NATS users file): 0600 from the first byte
(never written wider and narrowed after), replaced atomically so a reader never sees half.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def new_password() -> str:
    """URL-safe (it travels inside DATABASE_URL and NATS_URL), starting with a letter (NATS)."""
    return "p" + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")


def private_folder(path: Path) -> Path:
    """``path`` as a folder only its owner may enter."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def write_private(path: Path, content: str | bytes) -> None:
    """``content`` into ``path`` (its folder made private), 0600 from its first byte."""
    path = Path(path)
    private_folder(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)
