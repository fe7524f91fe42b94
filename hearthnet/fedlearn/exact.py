"""Exact, order-independent weighted means (DESIGN.md §4: the aggregate is reproducible).

Per key, every participant's values are rounded onto one power-of-two grid, chosen from the
largest |value| across all participants, so each becomes an integer q with |q| ≤ 2^GRID_BITS.
A compiled kernel (numba) computes, per element, Σ_i w_i·rint(x_i·2^s) in float64: the scaling
is exact (a power of two), `rint` rounds half to even, every product (< 2^42) and partial sum
(< 2^47) is an integer below 2^53 and therefore exact. Elements are independent, so the
kernel's threads cannot change a bit; dividing by Σw and rescaling are single correctly-rounded
IEEE operations. The result is bit-identical on every machine, in any participant order. The
only loss is the rounding onto the grid: at most 2^-(GRID_BITS+1) of the key's largest |value|.

Small keys are batched into one block (each keeping its own grid through a per-element scale)
so per-call overhead stays small; memory is participants × one block (or one large key).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from numba import njit, prange

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError

_thread_lock = threading.Lock()


@njit(parallel=True, cache=True, fastmath=False)
def _grid_sum(rows: np.ndarray, scale: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out[j] = Σ_i w[i]·rint(rows[i, j]·scale[j]), exactly (see the module docstring)."""
    n, size = rows.shape
    for j in prange(size):
        s = scale[j]
        acc = 0.0
        for i in range(n):
            acc += w[i] * np.rint(np.float64(rows[i, j]) * s)
        out[j] = acc


def _failed(message: str) -> HearthnetError:
    return HearthnetError(ErrorCode.FEDLEARN_AGGREGATION_FAILED, message)


def max_abs(tensors: Sequence[torch.Tensor]) -> float:
    """Largest |value| over all tensors; `fedlearn_aggregation_failed` if any is not finite."""
    best = 0.0
    for t in tensors:
        if t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t)
        lo_f, hi_f = float(lo), float(hi)
        if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
            raise _failed("an input tensor is not finite")
        best = max(best, -lo_f, hi_f)
    return best


def grid_shift(largest: float, bits: int = C.FEDLEARN_AGG_GRID_BITS) -> int | None:
    """The power of two that maps `largest` just below 2^bits; None when everything is zero."""
    if largest == 0.0:
        return None
    _, exponent = math.frexp(largest)  # largest < 2^exponent
    return bits - exponent


def _check(column: Sequence[torch.Tensor], weights: Sequence[int]) -> None:
    if not column or len(column) != len(weights):
        raise _failed("nothing to aggregate")
    if any(t.shape != column[0].shape for t in column):
        raise _failed("tensors to aggregate differ in shape")
    if any(w < 1 for w in weights):
        raise _failed("weights must be positive integers")


def _as_f32(t: torch.Tensor) -> torch.Tensor:
    """Flat float32; float64 → float32 is a correctly rounded (deterministic) conversion."""
    flat = t.detach().reshape(-1)
    return flat if flat.dtype == torch.float32 else flat.to(torch.float32)


def exact_weighted_means(
    columns: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
    bits: int = C.FEDLEARN_AGG_GRID_BITS,
) -> list[torch.Tensor]:
    """Σ w_i·t_i / Σ w_i for each column (one key's tensors, in participant order); each key is
    bit-identical to computing it alone, in any participant order, on any machine."""
    for column in columns:
        _check(column, weights)
    if bits > C.FEDLEARN_AGG_GRID_BITS:
        raise ValueError("sums stay exact for at most FEDLEARN_AGG_GRID_BITS bits")
    n = len(weights)
    sizes = [col[0].numel() for col in columns]
    rows = torch.empty(n, sum(sizes), dtype=torch.float32)
    for i in range(n):
        torch.cat([_as_f32(col[i]) for col in columns], out=rows[i])
    shifts, start = [], 0
    for size in sizes:  # one pass per key over all participants' values
        shifts.append(grid_shift(max_abs([rows[:, start : start + size]]), bits))
        start += size
    scale = np.concatenate(
        [np.full(k, 0.0 if s is None else 2.0**s) for s, k in zip(shifts, sizes, strict=True)]
    )
    acc = np.empty(rows.shape[1], dtype=np.float64)
    _grid_sum(rows.numpy(), scale, np.array([float(w) for w in weights]), acc)
    acc /= float(sum(weights))
    out: list[torch.Tensor] = []
    start = 0
    for col, size, shift in zip(columns, sizes, shifts, strict=True):
        piece = torch.from_numpy(acc[start : start + size])
        if shift is not None:
            piece = piece * 2.0**-shift
        out.append(piece.to(out_dtype).reshape(col[0].shape))
        start += size
    return out


def exact_weighted_mean(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
    bits: int = C.FEDLEARN_AGG_GRID_BITS,
) -> torch.Tensor:
    """Σ w_i·t_i / Σ w_i, bit-identical for the same inputs in any order on any machine."""
    return exact_weighted_means([tensors], weights, out_dtype, bits)[0]


def plan_groups(
    sizes: Sequence[int], limit: int = C.FEDLEARN_AGG_CHUNK_ELEMENTS
) -> list[list[int]]:
    """Consecutive keys batched until a block reaches `limit` elements; a larger key forms its
    own group."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if size > limit:
            groups.append([i])
            continue
        current.append(i)
        total += size
        if total >= limit:
            groups.append(current)
            current, total = [], 0
    if current:
        groups.append(current)
    return groups


def quantize_exact(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """t rounded onto its own 2^-bits grid, as integer-valued float64, and the shift used."""
    shift = grid_shift(max_abs([t]), bits)
    if shift is None:
        return torch.zeros(t.shape, dtype=torch.float64), 0
    return torch.round(t.to(torch.float64) * 2.0**shift), shift


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Pin torch to one thread, for library calls (LAPACK) whose rounding depends on threads."""
    with _thread_lock:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
