"""The numeric side of a round: exact means, the robust engine and its kernels, secure masking,
and the driver that aggregates a round's stored submissions (`run.py`). Heavy (torch, numba);
wire messages and the event fold never import it (docs/decisions.md, issue 14)."""
