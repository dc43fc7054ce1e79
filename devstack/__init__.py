"""The system on one machine: what ``pflea up``, the tests, the chaos suite and the benchmark share.

Embedded servers (``embedded``, ``pg_identity``) on free ports (``ports``), a migrated template
database and its copies (``databases``), a Postgres and a nats-server of our own in one folder
(``servers``), and the services as subprocesses, ready when their ``/readyz`` says so
(``processes``). No service imports this package; ``shared`` is the library the services run on.
"""
