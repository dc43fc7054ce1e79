"""A local Purple Flea transaction API: deterministic feeds, injectable faults, ground truth.

Used as the ground truth by the tests and as the default source for ``make up``. Transaction
*n* of an agent is the same text for the same seed, however fast the feed is polled; faults
(429, 5xx, hangs, repeated pages, malformed items) are seeded too, and ``/admin/truth`` says
what every item is. See :mod:`.app` for the HTTP surface and :mod:`.config` for the knobs.
"""

from __future__ import annotations

from .app import create_app, running_simulator
from .config import FaultKnobs, SimulatorConfig, load_simulator_config
from .malformed import KINDS as MALFORMED_KINDS
from .simulator import Simulator

__all__ = [
    "MALFORMED_KINDS",
    "FaultKnobs",
    "Simulator",
    "SimulatorConfig",
    "create_app",
    "load_simulator_config",
    "running_simulator",
]
