"""Relay: the tailers of the events table, committed events to PFLEA_EVENTS and agent snapshots."""
