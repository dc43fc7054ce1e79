"""The pure cores of the read models: ``apply(state, event)`` folds with no I/O.

Shared because the projector services, command validation (the writer) and time travel
(the CLI) must all compute balances the same way.
"""
