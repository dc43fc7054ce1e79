"""A seeded generator of realistic agent histories, and an independent fold written straight from
the issue's definitions (deliberately not sharing code with the projectors it checks)."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, Inexact, localcontext
from typing import Any

import msgspec

from shared.store import NewEvent, StreamEvent

ASSETS = ["PFLEA", "USDC", "BTC"]
Q18 = Decimal(1).scaleb(-18)


def _amount(rng: random.Random) -> Decimal:
    whole = rng.choice([0, 1, 5, 20, 250, 10_000])
    return Decimal(rng.randint(0, max(whole, 1) * 10**6)).scaleb(-rng.choice([0, 2, 6, 18])) + Decimal(
        "0.000000000000000001"
    )


def generate(seed: int, agents: int, events: int) -> list[StreamEvent]:
    """Events over ``agents`` streams, every type of the catalogue represented."""
    rng = random.Random(seed)
    out: list[StreamEvent] = []
    start = datetime(2026, 1, 1, tzinfo=UTC)
    kinds = [
        "FundsDeposited",
        "FundsWithdrawn",
        "BetPlaced",
        "BetWon",
        "FeeCharged",
        "FaucetClaimed",
        "EscrowLocked",
        "EscrowReleased",
        "TradeExecuted",
        "WalletTransferIn",
        "WalletTransferOut",
        "AssetSwapped",
        "DomainPurchased",
        "DomainRenewed",
        "DomainSold",
        "UnknownTransaction",
        "AgentRegistered",
    ]
    weights = [6, 2, 10, 5, 3, 2, 2, 2, 3, 1, 1, 1, 1, 1, 1, 1, 1]
    for n in range(events):
        agent = f"agent-{rng.randrange(agents):03d}"
        kind = rng.choices(kinds, weights)[0]
        asset = rng.choice(ASSETS)
        data: dict[str, Any] = {"tx_id": f"g{seed}-{n}"}
        if kind == "UnknownTransaction":
            data.update(source_type="airdrop_v2", raw={"amount": "5"})
        elif kind == "AgentRegistered":
            data.update(name=agent)
        else:
            data.update(amount=str(_amount(rng)), asset=asset)
        if kind == "TradeExecuted":
            data.update(
                side=rng.choice(["buy", "sell"]),
                instrument=rng.choice(["BTC", "ETH"]),
                quantity=str(_amount(rng)),
            )
        if kind == "AssetSwapped":
            data.update(to_asset=rng.choice(ASSETS), to_amount=str(_amount(rng)))
        if kind.startswith("Domain"):
            data.update(domain=f"{agent}.pflea")
        if kind in ("BetPlaced", "BetWon"):
            data.update(game=rng.choice(["dice", "crash", "slots"]))
        out.append(
            StreamEvent(
                agent,
                "agent",
                NewEvent(
                    event_id=uuid.uuid4(),
                    event_type=kind,
                    data=msgspec.json.encode(data).decode(),
                    occurred_at=start + timedelta(seconds=n),
                    schema_version=2 if kind == "BetPlaced" else 1,
                ),
            )
        )
    return out


_BALANCE_SIGN = {
    "FundsDeposited": 1,
    "BetWon": 1,
    "FaucetClaimed": 1,
    "EscrowReleased": 1,
    "WalletTransferIn": 1,
    "DomainSold": 1,
    "FundsWithdrawn": -1,
    "BetPlaced": -1,
    "EscrowLocked": -1,
    "FeeCharged": -1,
    "WalletTransferOut": -1,
    "DomainPurchased": -1,
    "DomainRenewed": -1,
}


def _ratio(a: Decimal, b: Decimal) -> Decimal:
    with localcontext() as ctx:
        ctx.prec, ctx.Emax = 200, 10**6
        ctx.traps[Inexact] = False  # a ratio is rounded on purpose, to 18 places
        return Decimal(0) if b == 0 else (Decimal(a) / b).quantize(Q18, rounding=ROUND_HALF_EVEN)


def fold(
    events: list[tuple[str, str, dict[str, Any]]],
) -> dict[str, dict[tuple[str, str], dict[str, Decimal]]]:
    """balances, pnl, portfolio and leaderboard rows from (agent, event_type, data) in order."""
    with localcontext() as ctx:
        ctx.prec, ctx.Emax = 200, 10**6  # its own arithmetic, independent of the ledger's
        ctx.traps[Inexact] = True  # a sum that rounds would be a test bug: fail loudly
        return _fold(events)


def _fold(
    events: list[tuple[str, str, dict[str, Any]]],
) -> dict[str, dict[tuple[str, str], dict[str, Decimal]]]:
    balance: dict[tuple[str, str], Decimal] = {}
    escrow: dict[tuple[str, str], Decimal] = {}
    pnl: dict[tuple[str, str], dict[str, Decimal]] = {}
    volume: dict[tuple[str, str], Decimal] = {}

    def move(agent: str, asset: str, delta: Decimal) -> None:
        balance[(agent, asset)] = balance.get((agent, asset), Decimal(0)) + delta

    for agent, kind, data in events:
        amount = Decimal(data.get("amount", "0"))
        asset = data.get("asset", "PFLEA")
        key = (agent, asset)
        if kind in _BALANCE_SIGN:
            move(agent, asset, _BALANCE_SIGN[kind] * amount)
        if kind == "EscrowLocked":
            escrow[key] = escrow.get(key, Decimal(0)) + amount
        if kind == "EscrowReleased":
            escrow[key] = escrow.get(key, Decimal(0)) - amount
        if kind == "TradeExecuted":
            sign = 1 if data["side"] == "buy" else -1
            move(agent, asset, -sign * amount)
            move(agent, data["instrument"], sign * Decimal(data["quantity"]))
            volume[key] = volume.get(key, Decimal(0)) + amount
        if kind == "AssetSwapped":
            move(agent, asset, -amount)
            move(agent, data["to_asset"], Decimal(data["to_amount"]))
        if kind in ("BetPlaced", "BetWon", "FeeCharged"):
            row = pnl.setdefault(key, defaultdict(Decimal))
            if kind == "BetPlaced":
                row["total_wagered"] += amount
                row["bet_count"] += 1
                volume[key] = volume.get(key, Decimal(0)) + amount
            elif kind == "BetWon":
                row["total_won"] += amount
                row["win_count"] += 1
            else:
                row["total_fees"] += amount

    pnl_rows = {}
    for key, r in pnl.items():
        net = r["total_won"] - r["total_wagered"] - r["total_fees"]
        pnl_rows[key] = {
            "total_wagered": r["total_wagered"],
            "total_won": r["total_won"],
            "total_fees": r["total_fees"],
            "bet_count": r["bet_count"],
            "win_count": r["win_count"],
            "net_pnl": net,
            "win_rate": _ratio(r["win_count"], r["bet_count"]),
            "roi": _ratio(net, r["total_wagered"]),
        }
    portfolio = {}
    for key in set(balance) | set(escrow):
        available, held = balance.get(key, Decimal(0)), escrow.get(key, Decimal(0))
        portfolio[key] = {"available": available, "in_escrow": held, "total": available + held}
    leaderboard = {}
    for key in set(pnl_rows) | set(volume):
        row = pnl_rows.get(key, {})
        leaderboard[key] = {
            "net_pnl": row.get("net_pnl", Decimal(0)),
            "roi": row.get("roi", Decimal(0)),
            "win_rate": row.get("win_rate", Decimal(0)),
            "volume": volume.get(key, Decimal(0)),
        }
    return {
        "balances": {k: {"balance": v} for k, v in balance.items()},
        "pnl": pnl_rows,
        "portfolio": portfolio,
        "leaderboard_entries": leaderboard,
    }


async def table_rows(conn: Any, table: str, columns: list[str]) -> dict[tuple[str, str], dict[str, Decimal]]:
    rows = await conn.fetch(f"SELECT agent_id, asset, {', '.join(columns)} FROM {table}")
    return {(r["agent_id"], r["asset"]): {c: r[c] for c in columns} for r in rows}


async def stored_events(conn: Any) -> list[tuple[str, str, dict[str, Any]]]:
    rows = await conn.fetch("SELECT stream_id, event_type, data FROM events ORDER BY position")
    return [(r["stream_id"], r["event_type"], msgspec.json.decode(r["data"])) for r in rows]


TABLE_COLUMNS = {
    "balances": ["balance"],
    "pnl": [
        "total_wagered",
        "total_won",
        "total_fees",
        "bet_count",
        "win_count",
        "net_pnl",
        "win_rate",
        "roi",
    ],
    "portfolio": ["available", "in_escrow", "total"],
    "leaderboard_entries": ["net_pnl", "roi", "win_rate", "volume"],
}


async def assert_read_models_match_fold(conn: Any, tables: list[str] | None = None) -> None:
    expected = fold(await stored_events(conn))
    for table in tables or list(TABLE_COLUMNS):
        actual = await table_rows(conn, table, TABLE_COLUMNS[table])
        assert set(actual) == set(expected[table]), f"{table}: rows differ"
        for key, row in expected[table].items():
            assert actual[key] == row, f"{table}{key}: {actual[key]} != {row}"
