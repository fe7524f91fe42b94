"""Compiled kernels for the robust rules (numba), reading participants' tensors in place.

Inputs come as a typed list of flat float32 arrays, key-major (part k·n + i is participant i's
tensor of key k), and a chunk table of (key, start, end) rows, as in `exact.py`. Chunks are the
unit of parallel work and their boundaries depend only on tensor sizes, never on the thread
count.

Reproducibility (docs/decisions.md): no kernel uses fast-math, so the compiler may neither reorder
nor fuse floating-point operations; every sum runs in a fixed order (participants by index,
coordinates by position in a fixed number of interleaved lanes, chunks in table order), and
IEEE-754 gives the same bits for the same sequence of operations on every machine.
Coordinate-wise results do not depend on participant order at all: each coordinate's values
are sorted first (by value, then weight).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit, prange

_SUB = 512  # columns per sorting-network pass: n rows of int64 stay in L1/L2


@njit(cache=True)
def _sortable(bits: np.int64) -> np.int64:
    """float32 bits → an integer whose order is the float order (-0 < +0); an involution."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@njit(parallel=True, cache=True, fastmath=False)
def trimmed_means(
    parts: Sequence[np.ndarray],
    n: int,
    chunks: np.ndarray,
    offsets: np.ndarray,
    network: np.ndarray,
    trim: int,
    rank: np.ndarray,
    w: np.ndarray,
    out: np.ndarray,
    used: np.ndarray,
) -> None:
    """Per coordinate: drop the `trim` smallest and largest values and write the w-weighted mean
    of the rest, clamped to the kept range (rounding then never leaves it); `used[c, i]` counts
    where participant i's value was kept in chunk c. The median is trim = (n-1)//2, equal w.

    `parts` are the float32 tensors viewed as int32. Each coordinate's n entries are packed as
    (sortable value bits, weight rank, participant) in one int64 and sorted by `network`
    (compare-exchange pairs: branch-free min/max over whole rows, which vectorises). The sort
    key makes the kept multiset and its order — hence the sum — independent of the order the
    participants came in: equal (value, weight) entries are interchangeable."""
    for c in prange(chunks.shape[0]):
        k, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        first = k * n
        counts = np.zeros(n, dtype=np.int64)
        rows = np.empty((n, _SUB), dtype=np.int64)
        value = np.empty(_SUB, dtype=np.float32)
        value_bits = value.view(np.int32)
        total = np.empty(_SUB)
        weight = np.empty(_SUB)
        for start in range(lo, hi, _SUB):
            width = min(_SUB, hi - start)
            for i in range(n):
                x = parts[first + i]
                tag = (rank[i] << 8) | i
                row = rows[i]
                for j in range(width):
                    row[j] = (_sortable(np.int64(x[start + j])) << 32) | tag
            for t in range(network.shape[0]):
                ra = rows[network[t, 0]]
                rb = rows[network[t, 1]]
                for j in range(width):
                    u = ra[j]
                    v = rb[j]
                    ra[j] = min(u, v)
                    rb[j] = max(u, v)
            for j in range(width):
                total[j] = 0.0
                weight[j] = 0.0
            for r in range(trim, n - trim):
                row = rows[r]
                for j in range(width):
                    e = row[j]
                    who = e & 0xFF
                    value_bits[j] = np.int32(_sortable(e >> 32))
                    total[j] += w[who] * np.float64(value[j])
                    weight[j] += w[who]
                    counts[who] += 1
            low = rows[trim]
            high = rows[n - trim - 1]
            base = offsets[k] + start
            for j in range(width):
                m = total[j] / weight[j]
                value_bits[j] = np.int32(_sortable(low[j] >> 32))
                m = max(m, np.float64(value[j]))
                value_bits[j] = np.int32(_sortable(high[j] >> 32))
                m = min(m, np.float64(value[j]))
                out[base + j] = m
        for i in range(n):
            used[c, i] = counts[i]


_BLOCK = 1024  # columns per distance pass, converted to float64 once for all pairs


@njit(parallel=True, cache=True, fastmath=False)
def pair_sq_distances(
    parts: Sequence[np.ndarray], n: int, chunks: np.ndarray, partial: np.ndarray
) -> None:
    """partial[c, i, q] (i < q) = Σ (x_i - x_q)² over chunk c in float64: eight interleaved
    lanes summed in a fixed tree, so the result is fixed whatever the machine."""
    for c in prange(chunks.shape[0]):
        k, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        first = k * n
        block = np.empty((n, _BLOCK))
        acc = np.zeros((n, n, 8))
        for start in range(lo, hi, _BLOCK):
            width = min(_BLOCK, hi - start)
            for i in range(n):
                x = parts[first + i]
                for j in range(width):
                    block[i, j] = x[start + j]
            for i in range(n):
                x = block[i]
                for q in range(i + 1, n):
                    y = block[q]
                    lanes = acc[i, q]
                    j = 0
                    while j + 8 <= width:
                        for t in range(8):
                            d = x[j + t] - y[j + t]
                            lanes[t] += d * d
                        j += 8
                    while j < width:
                        d = x[j] - y[j]
                        lanes[0] += d * d
                        j += 1
        for i in range(n):
            for q in range(i + 1, n):
                a = acc[i, q]
                partial[c, i, q] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))


@njit(parallel=True, cache=True, fastmath=False)
def sq_distances_to(
    parts: Sequence[np.ndarray],
    n: int,
    chunks: np.ndarray,
    offsets: np.ndarray,
    z: np.ndarray,
    partial: np.ndarray,
) -> None:
    """partial[c, i] = Σ (x_i - z)² over chunk c (z flat, float64, laid out by `offsets`);
    z = 0 gives squared norms."""
    for c in prange(chunks.shape[0]):
        k, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        first = k * n
        base = offsets[k]
        for i in range(n):
            x = parts[first + i]
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            a3 = 0.0
            j = lo
            while j + 4 <= hi:
                d0 = np.float64(x[j]) - z[base + j]
                d1 = np.float64(x[j + 1]) - z[base + j + 1]
                d2 = np.float64(x[j + 2]) - z[base + j + 2]
                d3 = np.float64(x[j + 3]) - z[base + j + 3]
                a0 += d0 * d0
                a1 += d1 * d1
                a2 += d2 * d2
                a3 += d3 * d3
                j += 4
            while j < hi:
                d0 = np.float64(x[j]) - z[base + j]
                a0 += d0 * d0
                j += 1
            partial[c, i] = (a0 + a1) + (a2 + a3)


@njit(cache=True, fastmath=False)
def sq_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Σ (a - b)² over two flat float64 arrays, in a fixed order."""
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    j = 0
    size = a.shape[0]
    while j + 4 <= size:
        d0 = a[j] - b[j]
        d1 = a[j + 1] - b[j + 1]
        d2 = a[j + 2] - b[j + 2]
        d3 = a[j + 3] - b[j + 3]
        a0 += d0 * d0
        a1 += d1 * d1
        a2 += d2 * d2
        a3 += d3 * d3
        j += 4
    while j < size:
        d0 = a[j] - b[j]
        a0 += d0 * d0
        j += 1
    return (a0 + a1) + (a2 + a3)


@njit(cache=True, fastmath=False)
def reduce_chunks(partial: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in table order (numpy's own sum may regroup by CPU features)."""
    out = np.zeros(partial.shape[1:])
    flat_out = out.reshape(-1)
    for c in range(partial.shape[0]):
        flat = partial[c].reshape(-1)
        for t in range(flat.shape[0]):
            flat_out[t] += flat[t]
    return out
