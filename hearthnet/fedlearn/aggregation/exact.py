"""Exact, order-independent weighted means (docs/decisions.md, issue 12).

Per key, every participant's values are rounded onto one power-of-two grid, chosen from the
largest |value| across all participants, so each becomes an integer q with |q| ≤ 2^GRID_BITS.
Compiled kernels (numba) find each key's largest |value| and compute, per element,
Σ_i w_i·rint(x_i·2^s) in float64, reading the participants' tensors in place: the scaling
is exact (a power of two), `rint` rounds half to even, every product (< 2^42) and partial sum
(< 2^47) is an integer below 2^53 and therefore exact. Elements are independent, so the
kernel's threads cannot change a bit; dividing by Σw and rescaling are single correctly-rounded
IEEE operations. The result is bit-identical on every machine, in any participant order. The
only loss is the rounding onto the grid: at most 2^-(GRID_BITS+1) of the key's largest |value|.

Many keys go through one call (each keeping its own grid) so per-call overhead stays small; the
caller bounds memory by how many keys it loads at once (`plan_groups`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from numba import njit, prange
from numba.typed import List as TypedList

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError

_thread_lock = threading.Lock()


_CHUNK = 4096  # elements per parallel task: its float64 accumulator stays in L1
_EXPONENT_BITS = 0x7F800000  # |x| bits at or above this: x is inf or NaN


@njit(cache=True)
def _abs_bits_max(bits: np.ndarray) -> np.uint32:
    """Largest |x| of a float32 array read as uint32 bits: an integer max, which vectorises;
    at or above _EXPONENT_BITS means a non-finite value is present."""
    best = np.uint32(0)
    magnitude = np.uint32(0x7FFFFFFF)
    for j in range(bits.shape[0]):
        best = max(best, np.uint32(bits[j] & magnitude))
    return best


@njit(parallel=True, cache=True)
def _key_abs_bits(parts: Sequence[np.ndarray], n: int, out: np.ndarray) -> None:
    """out[k] = the largest |x| bits of key k over its n participants (parts are key-major:
    part k·n + i); parallel over every part, so even a single key keeps all threads busy."""
    scratch = np.zeros(len(parts), dtype=np.uint32)
    for p in prange(len(parts)):
        q = int(np.intp(p))  # prange counts in uint64; typed lists index by intp
        scratch[q] = _abs_bits_max(parts[q].view(np.uint32))
    for k in range(out.shape[0]):
        out[k] = scratch[k * n : (k + 1) * n].max()


@njit(cache=True, fastmath=False)
def _accumulate(
    parts: Sequence[np.ndarray],
    first: int,
    n: int,
    lo: int,
    s: float,
    w: np.ndarray,
    acc: np.ndarray,
) -> None:
    """acc[j] += Σ_i w[i]·rint(parts[first + i][lo + j]·s), two participants per sweep (fewer
    trips through acc). Every term and sum is an exact integer, so grouping is free."""
    i = 0
    while i + 1 < n:
        x, y = parts[first + i], parts[first + i + 1]
        wx, wy = w[i], w[i + 1]
        for j in range(acc.shape[0]):
            qx = np.rint(np.float64(x[lo + j]) * s)
            qy = np.rint(np.float64(y[lo + j]) * s)
            acc[j] += wx * qx + wy * qy
        i += 2
    if i < n:
        x, wx = parts[first + i], w[i]
        for j in range(acc.shape[0]):
            acc[j] += wx * np.rint(np.float64(x[lo + j]) * s)


@njit(parallel=True, cache=True, fastmath=False)
def _grid_means(
    parts: Sequence[np.ndarray],
    n: int,
    chunks: np.ndarray,
    offsets: np.ndarray,
    scale: np.ndarray,
    unscale: np.ndarray,
    w: np.ndarray,
    total_w: float,
    out: np.ndarray,
) -> None:
    """out[offsets[k] + j] = (Σ_i w[i]·rint(x_ki[j]·scale[k]) / total_w)·unscale[k], reading each
    participant's tensor in place. Every product and partial sum is an exact integer (see the
    module docstring), so the order of additions and the threads cannot change a bit."""
    for c in prange(chunks.shape[0]):
        k, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        acc = np.zeros(hi - lo)
        _accumulate(parts, k * n, n, lo, scale[k], w, acc)
        base = offsets[k] + lo
        u = unscale[k]
        for j in range(hi - lo):
            out[base + j] = (acc[j] / total_w) * u


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


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf: an integer max over the float32 bits (no temporary the size of t)."""
    if t.numel() == 0:
        return True
    return int(_abs_bits_max(as_f32(t).view(np.uint32))) < _EXPONENT_BITS


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


def as_f32(t: torch.Tensor) -> np.ndarray:
    """Flat contiguous float32 (a view when it already is); float64/16 → float32 conversion is
    correctly rounded, hence deterministic."""
    flat = t.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    return flat.contiguous().numpy()


def chunk_table(sizes: Sequence[int]) -> np.ndarray:
    """(key, start, end) rows covering every key in pieces of at most _CHUNK elements."""
    rows = [
        (k, lo, min(lo + _CHUNK, size))
        for k, size in enumerate(sizes)
        for lo in range(0, size, _CHUNK)
    ]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def exact_weighted_means(
    columns: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
    bits: int = C.FEDLEARN_AGG_GRID_BITS,
) -> list[torch.Tensor]:
    """Σ w_i·t_i / Σ w_i for each column (one key's tensors, in participant order); each key is
    bit-identical to computing it alone, in any participant order, on any machine.

    Two compiled passes read the participants' tensors where they lie: the largest |value| per
    key (an integer max over the float bits, which also finds non-finite values), then the grid
    sums, written straight into the output."""
    for column in columns:
        _check(column, weights)
    if bits > C.FEDLEARN_AGG_GRID_BITS:
        raise ValueError("sums stay exact for at most FEDLEARN_AGG_GRID_BITS bits")
    if out_dtype not in (torch.float32, torch.float64):
        raise ValueError("the mean is written as float32 or float64")
    n = len(weights)
    sizes = [col[0].numel() for col in columns]
    arrays = [as_f32(t) for col in columns for t in col]  # keeps the views alive
    parts = TypedList(arrays)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    out_np = np.empty(
        int(offsets[-1]), dtype=np.float64 if out_dtype == torch.float64 else np.float32
    )
    w = np.array([float(x) for x in weights])
    total_w = float(sum(weights))
    abs_bits = np.empty(len(sizes), dtype=np.uint32)
    _key_abs_bits(parts, n, abs_bits)
    if bool((abs_bits >= _EXPONENT_BITS).any()):
        raise _failed("an input tensor is not finite")
    shifts = [grid_shift(float(v), bits) for v in abs_bits.view(np.float32)]
    scale = np.array([0.0 if s is None else 2.0**s for s in shifts])
    unscale = np.array([1.0 if s is None else 2.0**-s for s in shifts])
    _grid_means(parts, n, chunk_table(sizes), offsets, scale, unscale, w, total_w, out_np)
    flat = torch.from_numpy(out_np)
    return [
        flat[int(offsets[k]) : int(offsets[k + 1])].reshape(col[0].shape).to(out_dtype)
        for k, col in enumerate(columns)
    ]


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
