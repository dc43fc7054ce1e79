"""Projectors: balance, pnl, portfolio and leaderboard, each its own process on PFLEA_EVENTS.

Each projection is a small module with a pure ``apply(state, event)`` fold over one agent's
events (state: a dict keyed by asset) and a ``ReadModel`` saying which table holds the rows.
``runner`` consumes, checkpoints and fills gaps; ``rebuild`` replays the log into new tables.
"""
