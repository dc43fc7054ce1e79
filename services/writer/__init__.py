"""Writer: PFLEA_TX → Postgres events (batched), and agent commands."""
