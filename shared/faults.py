"""Fault points for the fault-injection tests; each costs one dict lookup when unset.

- ``PFLEA_CRASH_AT=writer.after_commit:3``: the process dies with SIGKILL semantics
  (``os._exit``, no cleanup, no flush) on the 3rd hit of that point.
- ``PFLEA_FAIL_AT=writer.commit_reply_lost:2``: the 2nd hit raises :class:`InjectedFault`, a
  ``ConnectionError`` like a connection lost at that instant (e.g. after a commit whose reply
  never came back: the outcome is unknown to the caller).
- ``PFLEA_DELAY_AT=projector.apply:1.5``: every hit waits that many seconds (a slow database or
  a starved host), via :func:`delay_s`.
- ``PFLEA_CRASH_AT=writer.tx.<tx id>:1``: a transaction that kills the writer whenever it is
  about to be appended (the count restarts with each process).

Several points may be listed, comma-separated.
"""

from __future__ import annotations

import os
import sys


def _parse(variable: str) -> dict[str, str]:
    targets: dict[str, str] = {}
    for item in filter(None, os.environ.get(variable, "").split(",")):
        name, _, value = item.partition(":")
        targets[name.strip()] = value.strip()
    return targets


_counts: dict[str, int] = {}
_crash: dict[str, int] = {name: int(n or 1) for name, n in _parse("PFLEA_CRASH_AT").items()}
_fail: dict[str, int] = {name: int(n or 1) for name, n in _parse("PFLEA_FAIL_AT").items()}
_delay: dict[str, float] = {name: float(s or 0) for name, s in _parse("PFLEA_DELAY_AT").items()}
ARMED = bool(_crash or _fail or _delay)  # lets a hot path skip naming a point per item


class InjectedFault(ConnectionError):
    """A fail point fired: to the caller it looks like the connection dropped right here."""


def _hit(name: str) -> int:
    _counts[name] = _counts.get(name, 0) + 1
    return _counts[name]


def crash_point(name: str) -> None:
    if name not in _crash:
        return
    hit = _hit(name)
    if hit == _crash[name]:
        sys.stderr.write(f'{{"crash_point": "{name}", "hit": {hit}}}\n')
        sys.stderr.flush()
        os._exit(137)


def fail_point(name: str) -> None:
    if name not in _fail:
        return
    hit = _hit(f"fail:{name}")
    if hit == _fail[name]:
        sys.stderr.write(f'{{"fail_point": "{name}", "hit": {hit}}}\n')
        sys.stderr.flush()
        raise InjectedFault(f"injected fault at {name} (hit {hit})")


def delay_s(name: str) -> float:
    """Seconds the caller should wait at ``name`` (0.0 unless ``PFLEA_DELAY_AT`` names it)."""
    return _delay.get(name, 0.0)
