"""Writer: PFLEA_TX → Postgres events (batched), and the relay of committed events to PFLEA_EVENTS."""
