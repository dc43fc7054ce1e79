"""What a projection is: a pure fold per agent, and the table its rows live in."""

from __future__ import annotations

from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any, Generic, TypeVar

from shared.events import Event

V = TypeVar("V")
AgentState = dict[str, V]  # asset -> value

SCALE = Decimal(1).scaleb(-18)
ZERO = Decimal(0)
# Enough digits that a ratio of any two sums is exact to 18 places before rounding.
_RATIO = Context(prec=100, Emax=999999, Emin=-999999)


def ratio(numerator: Decimal, denominator: Decimal) -> Decimal:
    """``numerator / denominator`` to 18 places, half-even; 0 when the denominator is 0."""
    if denominator == 0:
        return ZERO
    return _RATIO.divide(numerator, denominator).quantize(SCALE, rounding=ROUND_HALF_EVEN, context=_RATIO)


class ReadModel(Generic[V]):
    """One projection: its fold, and how a value becomes a row of ``table`` and back."""

    def __init__(
        self,
        name: str,
        table: str,
        columns: tuple[tuple[str, str], ...],
        apply: Callable[[AgentState[V], Event], None],
        to_row: Callable[[V], tuple[Any, ...]],
        from_row: Callable[[Any], V],
    ) -> None:
        self.name = name
        self.table = table
        self.columns = columns  # (name, postgres type) after agent_id and asset
        self.apply = apply
        self.to_row = to_row
        self.from_row = from_row

    @property
    def column_names(self) -> list[str]:
        return [name for name, _ in self.columns]
