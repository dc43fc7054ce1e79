"""balance per (agent, asset): the sum of every event's balance effect (``money_effect``)."""

from __future__ import annotations

from decimal import Decimal

from shared.events import Event, money_effect
from shared.projections.model import ZERO, AgentState, ReadModel


def apply(state: AgentState[Decimal], event: Event) -> None:
    for asset, delta in money_effect(event).balance:
        state[asset] = state.get(asset, ZERO) + delta


MODEL: ReadModel[Decimal] = ReadModel(
    name="balance",
    table="balances",
    columns=(("balance", "numeric"),),
    apply=apply,
    to_row=lambda value: (value,),
    from_row=lambda row: row["balance"],
)
