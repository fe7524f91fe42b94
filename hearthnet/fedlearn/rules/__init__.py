"""Robust aggregation rules, one class per file, found by name in `registry.py`.

Light by design (docs/decisions.md, issue 14): parsing a rule and its bounds imports no torch or
numba; a rule's `run` loads the kernels of `fedlearn/aggregation/` when a round aggregates.
"""
