"""Read-model rows and per-stream checkpoints in Postgres (all set-based: one query per batch)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from shared.projections.model import AgentState, ReadModel


async def load_states(
    conn: asyncpg.Connection, model: ReadModel[Any], agent_ids: list[str]
) -> dict[str, AgentState[Any]]:
    states: dict[str, AgentState[Any]] = {agent: {} for agent in agent_ids}
    rows = await conn.fetch(f"SELECT * FROM {model.table} WHERE agent_id = ANY($1::text[])", agent_ids)
    for row in rows:
        states[row["agent_id"]][row["asset"]] = model.from_row(row)
    return states


async def save_states(
    conn: asyncpg.Connection,
    model: ReadModel[Any],
    states: dict[str, AgentState[Any]],
    positions: dict[str, int],
    table: str | None = None,
) -> None:
    """Upsert every row of the given agents."""
    records = [
        (agent, asset, *model.to_row(value), positions[agent])
        for agent, state in states.items()
        for asset, value in state.items()
    ]
    if not records:
        return
    names = model.column_names
    types = [t for _, t in model.columns]
    columns = list(zip(*records, strict=True))
    unnest = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(["text", "text", *types, "bigint"]))
    updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in [*names, "last_position"])
    await conn.execute(
        f"""INSERT INTO {table or model.table} (agent_id, asset, {", ".join(names)}, last_position)
            SELECT * FROM unnest({unnest})
            ON CONFLICT (agent_id, asset) DO UPDATE SET {updates}""",
        *columns,
    )


async def lock_checkpoints(conn: asyncpg.Connection, name: str, streams: list[str]) -> dict[str, int]:
    """Each stream's applied version, row-locked (in stream order, so replicas never deadlock)."""
    await conn.execute(
        """INSERT INTO projection_checkpoints (projection, stream_id)
           SELECT $1, s FROM unnest($2::text[]) AS s ORDER BY s
           ON CONFLICT DO NOTHING""",
        name,
        streams,
    )
    rows = await conn.fetch(
        """SELECT stream_id, version FROM projection_checkpoints
           WHERE projection = $1 AND stream_id = ANY($2::text[])
           ORDER BY stream_id FOR UPDATE""",
        name,
        streams,
    )
    return {r["stream_id"]: r["version"] for r in rows}


async def save_checkpoints(conn: asyncpg.Connection, name: str, applied: dict[str, tuple[int, int]]) -> None:
    streams = list(applied)
    await conn.execute(
        """UPDATE projection_checkpoints c SET version = u.version, position = u.position
           FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS u(stream_id, version, position)
           WHERE c.projection = $1 AND c.stream_id = u.stream_id""",
        name,
        streams,
        [applied[s][0] for s in streams],
        [applied[s][1] for s in streams],
    )


async def advance_position(
    conn: asyncpg.Connection, name: str, position: int, event_at: datetime | None
) -> None:
    await conn.execute(
        """INSERT INTO projection_positions AS p (projection, position, applied_event_at)
           VALUES ($1, $2, $3)
           ON CONFLICT (projection) DO UPDATE
           SET position = greatest(p.position, EXCLUDED.position),
               applied_event_at = CASE WHEN EXCLUDED.position >= p.position
                                       THEN EXCLUDED.applied_event_at ELSE p.applied_event_at END,
               updated_at = clock_timestamp()""",
        name,
        position,
        event_at,
    )
