"""A wall clock that a scenario can jump for one service process.

With libfaketime (Debian package ``faketime``) the whole process sees the jump, C code and
``datetime.now`` included: ``LD_PRELOAD`` plus a timestamp file re-read on every call. Without
it, a ``sitecustomize`` shim shifts ``time.time``/``time.time_ns`` only (a ``datetime`` subclass
would break every C extension that type-checks datetimes); the pipeline's one ``datetime.now``
(``NewEvent.of``, for commands' events) is then not shifted. Either way CLOCK_MONOTONIC is left
alone: a real wall-clock jump (NTP step, VM resume) never moves it, and asyncio's timers use it.
"""

from __future__ import annotations

import os
from pathlib import Path

LIBFAKETIME = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)

_SHIM = '''
"""Chaos-suite shim: shift time.time() by the seconds in $PFLEA_CHAOS_CLOCK_FILE."""
import os as _os
import time as _time

_file = _os.environ["PFLEA_CHAOS_CLOCK_FILE"]
_real_time, _real_time_ns, _real_mono = _time.time, _time.time_ns, _time.monotonic
_cache = [0.0, -1.0]


def _offset():
    now = _real_mono()
    if now - _cache[1] > 0.05:
        try:
            with open(_file) as f:
                _cache[0] = float(f.read().strip() or 0)
        except (OSError, ValueError):
            pass
        _cache[1] = now
    return _cache[0]


_time.time = lambda: _real_time() + _offset()
_time.time_ns = lambda: _real_time_ns() + int(_offset() * 1e9)
'''

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def libfaketime() -> str | None:
    """The installed library, unless ``PFLEA_CHAOS_CLOCK=shim`` asks for the Python shim."""
    if os.environ.get("PFLEA_CHAOS_CLOCK") == "shim":
        return None
    return next((path for path in LIBFAKETIME if os.path.exists(path)), None)


def _seconds(offset: str) -> float:
    """``+1h`` -> 3600.0; ``-30m`` -> -1800.0; ``+0`` -> 0.0."""
    unit = offset[-1]
    return float(offset[:-1]) * _UNITS[unit] if unit in _UNITS else float(offset)


class SkewedClock:
    """One service's clock; :meth:`jump` moves it (the process need not restart)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.file = folder / "clock"
        self.library = libfaketime()
        self.jump("+0")

    @property
    def mechanism(self) -> str:
        return f"libfaketime ({self.library})" if self.library else "python sitecustomize shim"

    def jump(self, offset: str) -> None:
        text = offset if self.library else str(_seconds(offset))
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(self.file)  # atomic: a reader never sees an empty file

    def env(self, base: dict[str, str]) -> dict[str, str]:
        if self.library:
            return {
                "LD_PRELOAD": self.library,
                "FAKETIME_TIMESTAMP_FILE": str(self.file),
                "FAKETIME_NO_CACHE": "1",  # re-read on every call, so a jump lands at once
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            }
        (self.folder / "sitecustomize.py").write_text(_SHIM)
        path = base.get("PYTHONPATH", "")
        return {
            "PYTHONPATH": f"{self.folder}{os.pathsep}{path}" if path else str(self.folder),
            "PFLEA_CHAOS_CLOCK_FILE": str(self.file),
        }
