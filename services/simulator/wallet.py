"""What one simulated agent holds: balances per asset, locked escrows, domains.

The generator consults the wallet before every debit so that no balance ever goes negative;
that invariant is what lets tests fold the ground truth and compare it with the ledger.
"""

from __future__ import annotations

from decimal import Decimal

from shared.money import MONEY_CONTEXT

ZERO = Decimal(0)


class InsufficientFunds(ValueError):
    def __init__(self, asset: str, needed: Decimal, available: Decimal) -> None:
        super().__init__(f"{asset}: needs {needed}, only {available} available")
        self.asset = asset
        self.needed = needed
        self.available = available


class Wallet:
    """Balances never go below zero: :meth:`debit` refuses instead."""

    __slots__ = ("_balances", "escrows", "domains")

    def __init__(self) -> None:
        self._balances: dict[str, Decimal] = {}
        # escrow id -> (asset, amount), in locking order so releases can pick the oldest.
        self.escrows: dict[str, tuple[str, Decimal]] = {}
        self.domains: list[str] = []

    def balance(self, asset: str) -> Decimal:
        return self._balances.get(asset, ZERO)

    def balances(self) -> dict[str, Decimal]:
        return dict(sorted(self._balances.items()))

    def held_assets(self) -> list[str]:
        """Assets with a positive balance, sorted so choices among them are deterministic."""
        return sorted(asset for asset, amount in self._balances.items() if amount > 0)

    def locked(self) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = {}
        for asset, amount in self.escrows.values():
            totals[asset] = totals.get(asset, ZERO) + amount
        return dict(sorted(totals.items()))

    def credit(self, asset: str, amount: Decimal) -> None:
        self._balances[asset] = MONEY_CONTEXT.add(self.balance(asset), amount)

    def debit(self, asset: str, amount: Decimal) -> None:
        available = self.balance(asset)
        if amount > available:
            raise InsufficientFunds(asset, amount, available)
        self._balances[asset] = MONEY_CONTEXT.subtract(available, amount)

    def lock(self, escrow_id: str, asset: str, amount: Decimal) -> None:
        self.debit(asset, amount)
        self.escrows[escrow_id] = (asset, amount)

    def release(self, escrow_id: str) -> tuple[str, Decimal]:
        asset, amount = self.escrows.pop(escrow_id)
        self.credit(asset, amount)
        return asset, amount
