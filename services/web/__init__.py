"""The web explorer: leaderboard, an agent's history, time travel and what-if in a browser."""
