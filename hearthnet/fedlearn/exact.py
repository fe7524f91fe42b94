"""Exact, order-independent weighted means (DESIGN.md §4: the aggregate is reproducible).

Per key, every participant's values are rounded onto one power-of-two grid, chosen from the
largest |value| across all participants, so each becomes an integer q with |q| ≤ 2^GRID_BITS.
One fused float32 operation does the scaling and the rounding: y = M + x·2^s with
M = 1.5·2^23 rounds x·2^s to the nearest integer (ties to even) and keeps y an exact integer.
The weighted sum Σ w_i·y_i is then a float64 matrix-vector product whose every term (< 2^44)
and partial sum (< 2^50) is an integer below 2^53, so it is exact whatever order a BLAS, a
thread count or a vector width adds it in; subtracting M·Σw, dividing by Σw and rescaling are
single correctly-rounded IEEE operations. The result is bit-identical on every machine. The only
loss is the rounding onto the grid: at most 2^-(GRID_BITS+1) of the key's largest |value|.

Small keys are batched into one block (each keeping its own grid through a per-element scale)
and large keys are processed in windows, so per-call overhead stays small and the working set
stays in cache; coordinator memory is participants × one block.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError

_MAGIC = 1.5 * 2**23  # float32 ulp is 1 on [2^23, 2^24]: adding it rounds |v| < 2^22
_MAX_SCALE_EXP = 100  # 2^100 is a safe float32 scale; larger shifts are applied in two steps
_thread_lock = threading.Lock()


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


_MAGIC_T = torch.tensor(_MAGIC, dtype=torch.float32)


def _block_sum(
    block: torch.Tensor,
    scale: torch.Tensor,
    pre: torch.Tensor | None,
    w: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out = Σ_i w_i·(M + rint(block_i·scale)) in float64, for an (n × L) float32 block it may
    overwrite: four vectorised calls, whatever n is."""
    if pre is not None:  # tiny values: the first power-of-two step, exact
        block.mul_(pre)
    torch.addcmul(_MAGIC_T, block, scale, out=block)
    torch.mv(block.to(torch.float64).t(), w, out=out)


def _window(n: int) -> int:
    """Columns per window so the block and its float64 copy stay in a core's L2 cache."""
    return max(1024, C.FEDLEARN_AGG_WORKSET_ELEMENTS // n)


def _scales(shift: int | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    s = 0 if shift is None else shift
    if shift is None:
        return torch.zeros(size, dtype=torch.float32), None
    pre = max(0, s - _MAX_SCALE_EXP)
    main = torch.full((size,), 2.0 ** (s - pre), dtype=torch.float32)
    return main, (torch.full((size,), 2.0**pre, dtype=torch.float32) if pre else None)


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
        raise ValueError("the float32 kernel holds at most FEDLEARN_AGG_GRID_BITS bits")
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    total_w = float(sum(weights))
    sizes = [col[0].numel() for col in columns]
    out: list[torch.Tensor] = []
    n = len(weights)
    width = _window(n)
    if len(columns) == 1 and sizes[0] > C.FEDLEARN_AGG_CHUNK_ELEMENTS:
        shifts = [grid_shift(max_abs(columns[0]), bits)]
        flats = [_as_f32(t) for t in columns[0]]
        acc = torch.empty(sizes[0], dtype=torch.float64)
        for start in range(0, sizes[0], width):
            stop = min(start + width, sizes[0])
            scale, pre = _scales(shifts[0], stop - start)
            block = torch.stack([f[start:stop] for f in flats])
            _block_sum(block, scale, pre, w, acc[start:stop])
    else:
        total = sum(sizes)
        rows = torch.empty(n, total, dtype=torch.float32)
        for i in range(n):
            torch.cat([_as_f32(col[i]) for col in columns], out=rows[i])
        shifts, start = [], 0
        for size in sizes:  # one pass per key over all participants' values
            shifts.append(grid_shift(max_abs([rows[:, start : start + size]]), bits))
            start += size
        parts = [_scales(s, k) for s, k in zip(shifts, sizes, strict=True)]
        scale = torch.cat([p[0] for p in parts])
        pre = None
        if any(p[1] is not None for p in parts):
            pre = torch.cat(
                [
                    p[1] if p[1] is not None else torch.ones(k)
                    for p, k in zip(parts, sizes, strict=True)
                ]
            )
        acc = torch.empty(total, dtype=torch.float64)
        for start in range(0, total, width):
            stop = min(start + width, total)
            _block_sum(
                rows[:, start:stop],
                scale[start:stop],
                None if pre is None else pre[start:stop],
                w,
                acc[start:stop],
            )
    acc -= _MAGIC * total_w
    acc /= total_w
    start = 0
    for col, size, shift in zip(columns, sizes, shifts, strict=True):
        piece = acc[start : start + size] * 2.0 ** -(0 if shift is None else shift)
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
    """Consecutive keys batched until a block reaches `limit` elements; a key that large forms
    its own group (and is processed in windows)."""
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
