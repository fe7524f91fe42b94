"""Exact, order-independent weighted means (DESIGN.md §4: the aggregate is reproducible).

Per tensor, every participant's values are rounded onto one power-of-two grid, chosen from the
largest |value| across all participants, so each becomes an integer of at most
FEDLEARN_AGG_GRID_BITS bits. Their weighted sum is accumulated in float64, where every partial
sum is an integer below 2^53 and therefore exact: the result does not depend on participant
order, thread count, vector width or FMA. The final division and rescale are single IEEE
operations, correctly rounded everywhere. The only loss is the rounding onto the grid, at most
half a grid step: 2^-(GRID_BITS+1) of the largest |value|.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError

_F32_SAFE_SHIFT = 100  # beyond this, 2^shift or a scaled value may leave float32's range
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


def grid_shift(largest: float, bits: int) -> int | None:
    """The power of two that maps `largest` just below 2^bits; None when everything is zero."""
    if largest == 0.0:
        return None
    _, exponent = math.frexp(largest)  # largest < 2^exponent
    return bits - exponent


def exact_weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[int],
    shift: int,
    chunk: int = C.FEDLEARN_AGG_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Σ w_i·round(t_i·2^shift) as an exact, integer-valued float64 tensor."""
    shape = tensors[0].shape
    flats = [t.reshape(-1) for t in tensors]
    total = flats[0].numel()
    acc = torch.zeros(total, dtype=torch.float64)
    wide = abs(shift) > _F32_SAFE_SHIFT or any(t.dtype == torch.float64 for t in tensors)
    buf = torch.empty(min(chunk, total), dtype=torch.float64 if wide else torch.float32)
    scale = 2.0**shift
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        part, out = buf[: stop - start], acc[start:stop]
        for flat, weight in zip(flats, weights, strict=True):
            src = flat[start:stop]
            if src.dtype == part.dtype:
                torch.mul(src, scale, out=part)
            else:  # never scale in a narrow dtype: fp16 would overflow
                part.copy_(src)
                part.mul_(scale)
            part.round_()
            out.add_(part, alpha=weight)
    return acc.reshape(shape)


def exact_weighted_mean(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[int],
    bits: int = C.FEDLEARN_AGG_GRID_BITS,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Σ w_i·t_i / Σ w_i, bit-identical for the same inputs in any order on any machine."""
    if not tensors or len(tensors) != len(weights):
        raise _failed("nothing to aggregate")
    if any(t.shape != tensors[0].shape for t in tensors):
        raise _failed("tensors to aggregate differ in shape")
    if any(w < 1 for w in weights):
        raise _failed("weights must be positive integers")
    shift = grid_shift(max_abs(tensors), bits)
    if shift is None:
        return torch.zeros(tensors[0].shape, dtype=out_dtype)
    acc = exact_weighted_sum(tensors, weights, shift)
    acc.div_(float(sum(weights))).mul_(2.0**-shift)
    return acc.to(out_dtype)


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
