"""Round logic as pure state machines, one per role (docs/architecture.md, "Federated rounds").

Fed inputs with `now`, they return effects (`effects.py`) for a driver (`fedlearn/drivers/`) to
carry out; no asyncio, sockets, files or clocks inside.
"""
