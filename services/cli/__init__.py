"""``pflea``: the command line for operators and agents."""
