"""Crash points for the fault-injection tests: ``PFLEA_CRASH_AT=writer.after_commit:3``.

Each named point in the code calls ``crash_point(name)``; when the variable names it, the
process dies with SIGKILL semantics (``os._exit``, no cleanup, no flush) on the Nth hit. Unset
(the default), a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import sys

_counts: dict[str, int] = {}
_targets: dict[str, int] = {}

for _item in filter(None, os.environ.get("PFLEA_CRASH_AT", "").split(",")):
    _name, _, _nth = _item.partition(":")
    _targets[_name.strip()] = int(_nth or 1)


def crash_point(name: str) -> None:
    if name not in _targets:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _targets[name]:
        sys.stderr.write(f'{{"crash_point": "{name}", "hit": {_counts[name]}}}\n')
        sys.stderr.flush()
        os._exit(137)
