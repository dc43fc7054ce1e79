"""``pflea balance|pnl|portfolio AGENT``, ``pflea leaderboard`` and ``pflea events AGENT``.

Without ``--at``/``--version``/``--without``/``--add`` the answer is the read model (what the
projectors have applied). With them it is computed from the event log by :mod:`shared.history`:
exact, as of that point, and never touching what is stored.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.cli.connections import OK, agent_exists, run, settings, with_pool
from services.cli.render import print_json, print_table
from shared.history import (
    AgentView,
    AsOf,
    History,
    UnknownAgent,
    WhatIf,
    parse_added,
    parse_event_ids,
    parse_time,
)
from shared.projections import pnl
from shared.projections.agent import AgentFold

Rows = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Section:
    """One per-asset figure set: where the read model keeps it and how a fold yields it."""

    key: str  # the JSON key and WhatIf.difference() section
    table: str
    columns: tuple[str, ...]
    from_state: Callable[[AgentFold], Rows]


SECTIONS = {
    "balance": Section(
        "balances", "balances", ("balance",), lambda s: {a: {"balance": v} for a, v in s.balances().items()}
    ),
    "pnl": Section("pnl", "pnl", tuple(pnl.MODEL.column_names), lambda s: s.pnl_rows()),
    "portfolio": Section(
        "portfolio", "portfolio", ("available", "in_escrow", "total"), lambda s: s.portfolio_rows()
    ),
}


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for name, section in SECTIONS.items():
        p = sub.add_parser(name, help=f"an agent's {section.key}: now, as of a time or version, or what-if")
        p.add_argument("agent")
        p.add_argument("--asset", help="only this asset")
        when = p.add_mutually_exclusive_group()
        when.add_argument("--at", metavar="TIME", help="ISO 8601; a time without zone is UTC")
        when.add_argument("--version", type=int, metavar="N", help="after the agent's first N events")
        p.add_argument(
            "--by",
            choices=["occurred", "recorded"],
            default="occurred",
            help="--at compares with the source's time (occurred) or when we stored it (recorded)",
        )
        p.add_argument(
            "--without",
            nargs="+",
            action="extend",
            default=[],
            metavar="EVENT_ID",
            help="what if these had not happened",
        )
        p.add_argument(
            "--add",
            action="append",
            default=[],
            metavar="TYPE:JSON",
            help='what if this had happened too, e.g. \'BetWon:{"amount":"5","asset":"PFLEA"}\'',
        )
        p.add_argument("--json", action="store_true", help="one JSON object, amounts as strings")
        p.set_defaults(func=lambda args, s=section: run(lambda: _figures(args, s)))
    p = sub.add_parser("leaderboard", help="agents ranked by net P&L within each asset")
    p.add_argument("--asset")
    p.add_argument("--top", type=int, default=10, metavar="N", help="rows per asset (default 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda args: run(lambda: _leaderboard(args)))


def _as_of(args: argparse.Namespace) -> AsOf:
    if args.version is not None:
        return AsOf(version=args.version)
    if args.at is not None:
        return AsOf(at=parse_time(args.at), by=args.by)
    return AsOf()


def _only(rows: Rows, asset: str | None) -> Rows:
    return {a: r for a, r in rows.items() if asset is None or a == asset.upper()}


async def _figures(args: argparse.Namespace, section: Section) -> int:
    as_of = _as_of(args)
    without, added = parse_event_ids(args.without), parse_added(args.add)

    async def body(pool: asyncpg.Pool) -> int:
        if without or added:
            result = await History(pool).what_if(args.agent, without=without, add=added, as_of=as_of)
            _show_what_if(args, section, result)
        elif not as_of.is_now:
            _show_view(args, section, await History(pool).state(args.agent, as_of))
        else:
            _show_read_model(args, section, await _read_model(pool, args.agent, section))
        return OK

    result: int = await with_pool(settings(), body)
    return result


async def _read_model(pool: asyncpg.Pool, agent_id: str, section: Section) -> Rows:
    rows = await pool.fetch(
        f"SELECT asset, {', '.join(section.columns)} FROM {section.table} WHERE agent_id = $1 ORDER BY asset",
        agent_id,
    )
    if not rows and not await agent_exists(pool, agent_id):
        raise UnknownAgent(agent_id)
    return {r["asset"]: {c: r[c] for c in section.columns} for r in rows}


def _json_rows(section: Section, rows: Rows) -> Any:
    # A balance is one figure per asset: {"PFLEA": "12.5"} reads better than a nested object.
    return {a: r["balance"] for a, r in rows.items()} if section.key == "balances" else rows


def _show_read_model(args: argparse.Namespace, section: Section, rows: Rows) -> None:
    rows = _only(rows, args.asset)
    if args.json:
        print_json({"agent_id": args.agent, "source": "read_model", section.key: _json_rows(section, rows)})
        return
    print_table(["asset", *section.columns], [[a, *r.values()] for a, r in rows.items()])


def _as_of_json(view: AgentView) -> dict[str, Any]:
    return {
        "version": view.as_of.version,
        "at": view.as_of.at,
        "by": view.as_of.by if view.as_of.at else None,
    }


def _show_view(args: argparse.Namespace, section: Section, view: AgentView) -> None:
    rows = _only(section.from_state(view.state), args.asset)
    if args.json:
        print_json(
            {
                "agent_id": args.agent,
                "source": "events",
                "as_of": _as_of_json(view),
                "version": view.version,
                "events": view.events,
                section.key: _json_rows(section, rows),
            }
        )
        return
    print(f"{args.agent} as of {_describe(view)}: {view.events} of {view.head} events")
    print_table(["asset", *section.columns], [[a, *r.values()] for a, r in rows.items()])


def _describe(view: AgentView) -> str:
    if view.as_of.version is not None:
        return f"version {view.as_of.version}"
    if view.as_of.at is not None:
        return f"{view.as_of.at.isoformat()} ({view.as_of.by})"
    return "now"


def _show_what_if(args: argparse.Namespace, section: Section, result: WhatIf) -> None:
    actual = _only(section.from_state(result.actual.state), args.asset)
    hypothetical = _only(section.from_state(result.hypothetical.state), args.asset)
    difference = _only(result.difference()[section.key], args.asset)
    if args.json:
        print_json(
            {
                "agent_id": args.agent,
                "source": "events",
                "as_of": _as_of_json(result.actual),
                "excluded": result.hypothetical.excluded,
                "added": result.hypothetical.added,
                section.key: _json_rows(section, hypothetical),
                "actual": {section.key: _json_rows(section, actual)},
                "difference": {section.key: _json_rows(section, difference) if difference else {}},
            }
        )
        return
    print(f"{args.agent} as of {_describe(result.actual)}, what if:")
    table = []
    for asset in sorted(set(actual) | set(hypothetical)):
        for column in section.columns:
            was = actual.get(asset, {}).get(column)
            now = hypothetical.get(asset, {}).get(column)
            change = difference.get(asset, {}).get(column)
            table.append([asset, column, was, now, change if change is not None else ""])
    print_table(["asset", "figure", "actual", "what-if", "difference"], table)


async def _leaderboard(args: argparse.Namespace) -> int:
    async def body(pool: asyncpg.Pool) -> list[asyncpg.Record]:
        result: list[asyncpg.Record] = await pool.fetch(
            """SELECT asset, rank, agent_id, net_pnl, roi, win_rate, volume, bet_count FROM (
                   SELECT *, row_number() OVER (PARTITION BY asset ORDER BY rank, agent_id) AS place
                   FROM leaderboard WHERE $1::text IS NULL OR asset = $1) ranked
               WHERE place <= $2 ORDER BY asset, rank, agent_id""",
            args.asset.upper() if args.asset else None,
            args.top,
        )
        return result

    rows = await with_pool(settings(), body)
    if args.json:
        print_json({"leaderboard": [dict(r) for r in rows]})
    else:
        columns = ["asset", "rank", "agent_id", "net_pnl", "roi", "win_rate", "volume", "bet_count"]
        print_table(columns, [[r[c] for c in columns] for r in rows], empty="(no bets yet)")
    return OK
