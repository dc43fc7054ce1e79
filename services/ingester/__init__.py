"""Ingester: polls Purple Flea per agent and publishes each valid transaction to PFLEA_TX."""
