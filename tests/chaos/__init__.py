"""The seeded chaos suite (issue 8): a harness, one invariant checker, and scenario schedules.

- ``servers.py``: the Postgres and nats-server a chaos module owns (``devstack.servers`` plus
  the faults: kill, stop -m immediate, SIGSTOP/SIGCONT, restart on the same ports and data);
- ``harness.py``: one run: the real services as subprocesses, the schedule, convergence with a
  deadline, a clean SIGTERM stop, then ``checker.py`` (the six invariants); ``report.py`` holds
  the verdict and its figures;
- ``scenarios.py``: each scenario's fault schedule as a pure function of the seed, and the
  table of pipeline scenarios (name, claim, schedule, what they run on, what they must show);
- ``poison.py``, ``backlog.py``, ``clock.py``: hand-made poison items, a 100k-event backlog, a
  wall clock that jumps (libfaketime when installed: ``apt-get install faketime``).

The scenarios run from ``tests/test_chaos.py`` (the table, one test body) and
``tests/test_chaos_load.py`` (commands racing, a 100k backlog); ``tests/test_chaos_checker.py``
proves the checker finds what it exists to find. Marker ``chaos``; they run with ``make test``.

- Default: seeds 1,2,3 (the 100k-backlog scenario: seed 1 only), about five minutes on two
  cores: ``.venv/bin/python -m pytest -m chaos -q``.
- Longer run: ``PFLEA_CHAOS_SEEDS=$(seq -s, 1 20) .venv/bin/python -m pytest -m chaos -q``
  (every scenario, the backlog one too, once per seed: about 45 minutes).
- ``PFLEA_CHAOS_REPORT=chaos.jsonl`` appends each run's figures (missing, duplicates, extra,
  recovery seconds, events out of source order) as JSON lines; ``-s`` prints them.
- ``PFLEA_CHAOS_DEBUG=1`` prints convergence progress; ``PFLEA_CHAOS_CLOCK=shim`` forces the
  Python clock shim instead of libfaketime.

A failure prints the seed, the schedule and the command that replays it.
"""
