"""Projector services: each projection (``shared.projections``) as its own process.

``runner`` consumes PFLEA_EVENTS, ``apply`` checkpoints and fills gaps, ``rebuild`` replays the
log into new tables and swaps them in.
"""
