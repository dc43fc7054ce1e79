"""The feed's epoch, kept in a state folder so a restarted simulator serves what it served.

The feed's clock counts from its epoch. A simulator that starts its clock afresh has served
only its backlog, so the ingester's cursor (a transaction the previous one served) is unknown
to it and every poll is refused with ``unknown_since``. With ``PFLEA_SIM_STATE_DIR`` the first
start writes the epoch there and every later start reads it back: ``pflea up`` points it at its
data folder, compose at a named volume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import msgspec

from shared.settings import SettingsError

from .config import ENV_NAMES, SimulatorConfig

# The name `pflea up` always used in its data folder, so an existing data folder keeps its epoch.
EPOCH_FILE = "simulator.json"

log = logging.getLogger("services.simulator")


class EpochRecord(msgspec.Struct, frozen=True):
    epoch: float


def feed_epoch(config: SimulatorConfig) -> float:
    """Unix time the feed's clock counts from: ``PFLEA_SIM_EPOCH`` if set, else the one kept in
    ``PFLEA_SIM_STATE_DIR`` if set, else 0 (start-up)."""
    if config.epoch or not config.state_dir:
        return config.epoch
    return kept_epoch(Path(config.state_dir))


def kept_epoch(state_dir: Path) -> float:
    """The epoch stored in ``state_dir``; on first use, the current time, stored there first.

    Raises :class:`SettingsError` naming ``PFLEA_SIM_STATE_DIR`` if the folder is unusable.
    """
    path = state_dir / EPOCH_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=EpochRecord).epoch
    except FileNotFoundError:
        pass
    except msgspec.DecodeError as exc:
        # Only a hand edit or a non-atomic write from an older version can leave this.
        log.warning(
            "unreadable epoch file, starting a new feed clock", extra={"path": str(path), "error": str(exc)}
        )
    except OSError as exc:
        raise SettingsError(ENV_NAMES["state_dir"], f"cannot read {path}: {exc}") from None
    epoch = time.time()
    try:
        _write_atomically(path, msgspec.json.encode(EpochRecord(epoch)))
    except OSError as exc:
        raise SettingsError(ENV_NAMES["state_dir"], f"cannot keep the epoch in {state_dir}: {exc}") from None
    return epoch


def _write_atomically(path: Path, data: bytes) -> None:
    """A reader sees the old file or the whole new one, never part of it (the file is 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
