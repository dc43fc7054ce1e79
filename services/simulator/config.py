"""The simulator's knobs, from ``PFLEA_SIM_*`` variables; a bad value names its variable.

The fault knobs are a struct of their own because they also change at runtime
(``POST /admin/faults``): tests turn faults on, then off again so the system can converge.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import msgspec

from shared.settings import SettingsError, read_environ

FAULT_ENV_NAMES: dict[str, str] = {
    "repeat_page_rate": "PFLEA_SIM_REPEAT_PAGE_RATE",
    "too_many_requests_rate": "PFLEA_SIM_429_RATE",
    "retry_after": "PFLEA_SIM_RETRY_AFTER",
    "server_error_rate": "PFLEA_SIM_5XX_RATE",
    "hang_rate": "PFLEA_SIM_HANG_RATE",
    "hang_s": "PFLEA_SIM_HANG_S",
    "malformed_rate": "PFLEA_SIM_MALFORMED_RATE",
}

ENV_NAMES: dict[str, str] = {
    "host": "PFLEA_SIM_HOST",
    "port": "PFLEA_SIM_PORT",
    "seed": "PFLEA_SIM_SEED",
    "agents": "PFLEA_SIM_AGENTS",
    "backlog": "PFLEA_SIM_BACKLOG",
    "rate": "PFLEA_SIM_RATE",
    "max_per_agent": "PFLEA_SIM_MAX_PER_AGENT",
    "numeric_amount_rate": "PFLEA_SIM_NUMERIC_AMOUNT_RATE",
    "epoch": "PFLEA_SIM_EPOCH",
    "faucet_limit": "PFLEA_SIM_FAUCET_LIMIT",
    "state_dir": "PFLEA_SIM_STATE_DIR",
    "history": "PFLEA_SIM_HISTORY",
}


_PROBABILITIES = (
    "repeat_page_rate",
    "too_many_requests_rate",
    "server_error_rate",
    "hang_rate",
    "malformed_rate",
)


def _probability(variable: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise SettingsError(variable, f"must be a probability between 0 and 1, got {value!r}")


def _at_least(variable: str, value: float, minimum: float) -> None:
    if not (math.isfinite(value) and value >= minimum):
        raise SettingsError(variable, f"must be a finite number >= {minimum}, got {value!r}")


class FaultKnobs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Probabilities of each injected fault, per ``/transactions`` request (``malformed_rate``: per
    generated transaction). All zero by default: a clean feed."""

    repeat_page_rate: float = 0.0
    too_many_requests_rate: float = 0.0
    retry_after: int = 1
    server_error_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 30.0
    malformed_rate: float = 0.0

    def __post_init__(self) -> None:
        for field in _PROBABILITIES:
            _probability(FAULT_ENV_NAMES[field], getattr(self, field))
        _at_least(FAULT_ENV_NAMES["retry_after"], self.retry_after, 0)
        _at_least(FAULT_ENV_NAMES["hang_s"], self.hang_s, 0)


# With PFLEA_SIM_HISTORY unset the simulator keeps about this many transactions in all, an
# equal share per agent between these bounds: memory follows configuration, not the number of
# agents times a per-agent window (500 agents x 1,000 once grew past 280 MB in a soak).
HISTORY_BUDGET = 100_000
HISTORY_PER_AGENT = (100, 1_000)


class SimulatorConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that decides what the simulator serves.

    Two simulators with equal ``seed``, ``agents``, ``numeric_amount_rate`` and malformed rate
    serve identical feeds (transaction *n* of an agent is the same text), however fast they are
    polled. ``rate`` only decides how soon transactions past the ``backlog`` appear.
    """

    host: str = "127.0.0.1"
    port: int = 8088
    seed: int = 1
    agents: int = 20
    backlog: int = 50
    rate: float = 100.0
    max_per_agent: int = 0
    numeric_amount_rate: float = 0.1
    # Unix time the feed's clock counts from (0: start-up). A restarted simulator with the same
    # epoch serves every transaction it served before, as the real API would after our restart.
    epoch: float = 0.0
    # POST /claim answers success: false after this many claims per agent (0: no limit).
    faucet_limit: int = 0
    # Where the epoch is kept when ``epoch`` is 0 (see :mod:`.epoch`); empty: nowhere.
    state_dir: str = ""
    # Transactions kept per agent (over all its feeds); older ones are dropped and a cursor
    # among them is answered 400 unknown_since (see :mod:`.feed`). 0: a share of
    # HISTORY_BUDGET (see :attr:`history_per_agent`).
    history: int = 0
    faults: FaultKnobs = FaultKnobs()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(ENV_NAMES["port"], f"must be a TCP port 0..65535, got {self.port}")
        if not self.host:
            raise SettingsError(ENV_NAMES["host"], "must not be empty")
        _at_least(ENV_NAMES["seed"], self.seed, 0)
        _at_least(ENV_NAMES["agents"], self.agents, 1)
        _at_least(ENV_NAMES["backlog"], self.backlog, 0)
        _at_least(ENV_NAMES["rate"], self.rate, 0)
        _at_least(ENV_NAMES["max_per_agent"], self.max_per_agent, 0)
        _at_least(ENV_NAMES["faucet_limit"], self.faucet_limit, 0)
        _at_least(ENV_NAMES["history"], self.history, 0)
        _probability(ENV_NAMES["numeric_amount_rate"], self.numeric_amount_rate)

    @property
    def history_per_agent(self) -> int:
        """``history`` if set, else ``HISTORY_BUDGET`` shared by the agents (100 to 1,000 each)."""
        if self.history:
            return self.history
        low, high = HISTORY_PER_AGENT
        return max(low, min(high, HISTORY_BUDGET // self.agents))


def load_simulator_config(environ: Mapping[str, str] | None = None, **overrides: Any) -> SimulatorConfig:
    """Read the config from ``environ`` (default ``os.environ``); ``overrides`` win.

    Raises :class:`shared.settings.SettingsError` naming the variable of a bad value.
    """
    env = os.environ if environ is None else environ
    faults = FaultKnobs(**read_environ(env, FAULT_ENV_NAMES, FaultKnobs))
    values = read_environ(env, ENV_NAMES, SimulatorConfig)
    values["faults"] = faults
    values.update(overrides)
    return SimulatorConfig(**values)
