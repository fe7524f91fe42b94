"""Operations on participants' whole updates, for the robust rules (`robust.py`).

Inputs are `Updates`: n participants' tensors key by key, loaded one block of keys at a time
(`exact.plan_groups`), so memory holds participants × one block — never whole deltas
(streaming). The arithmetic runs in the compiled kernels of `robust_kernels.py`
and the exact mean of `exact.py`; see those for why every result is reproducible bit for bit.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from numba.typed import List as TypedList

from hearthnet.fedlearn.aggregation import robust_kernels as K
from hearthnet.fedlearn.aggregation.exact import (
    as_f32,
    chunk_table,
    exact_weighted_means,
    plan_groups,
)

# --- inputs -----------------------------------------------------------------------------------


class Updates(Protocol):
    """n participants' updates, key by key; `load` returns, for each asked key, the n tensors
    in participant order (each the key's shape)."""

    @property
    def n(self) -> int:
        """How many participants."""

    def shapes(self) -> list[torch.Size]:
        """Each key's shape, in key order."""

    def load(self, keys: Sequence[int]) -> list[list[torch.Tensor]]:
        """For each of `keys`, the n participants' tensors; loaded on demand so a large round is
        never in memory at once."""


@dataclass(frozen=True)
class TensorUpdates:
    """Same-shape tensors as a one-key `Updates` (the functional API's input)."""

    tensors: Sequence[torch.Tensor]

    @property
    def n(self) -> int:
        """How many tensors."""
        return len(self.tensors)

    def shapes(self) -> list[torch.Size]:
        """The one key's shape."""
        return [self.tensors[0].shape]

    def load(self, keys: Sequence[int]) -> list[list[torch.Tensor]]:
        """The same tensors for every asked key."""
        return [list(self.tensors) for _ in keys]


@dataclass(frozen=True)
class Subset:
    """Some participants of `base`, each optionally scaled (a norm clip)."""

    base: Updates
    members: tuple[int, ...]
    scales: tuple[float, ...]

    @property
    def n(self) -> int:
        """How many members."""
        return len(self.members)

    def shapes(self) -> list[torch.Size]:
        """The base's shapes."""
        return self.base.shapes()

    def load(self, keys: Sequence[int]) -> list[list[torch.Tensor]]:
        """The members' tensors from `base`, each times its scale."""
        out = []
        for column in self.base.load(keys):
            picked = []
            for i, s in zip(self.members, self.scales, strict=True):
                t = column[i]
                # one correctly rounded float32 multiply per value: the same bits anywhere
                picked.append(t if s == 1.0 else t.to(torch.float32) * np.float32(s).item())
            out.append(picked)
        return out


@dataclass
class _Block:
    keys: list[int]
    arrays: list[np.ndarray]  # keeps the views alive while the kernels read them
    chunks: np.ndarray
    offsets: np.ndarray

    def parts(self, as_int32: bool = False) -> TypedList[np.ndarray]:
        return TypedList([a.view(np.int32) for a in self.arrays] if as_int32 else self.arrays)


def _blocks(updates: Updates) -> Iterator[_Block]:
    """One block of keys at a time; a block's tensors are released before the next loads, so
    memory holds participants × one block ."""
    sizes = [math.prod(s) for s in updates.shapes()]
    for group in plan_groups(sizes):
        arrays = [as_f32(t) for column in updates.load(group) for t in column]
        group_sizes = [sizes[k] for k in group]
        offsets = np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64)
        block = _Block(group, arrays, chunk_table(group_sizes), offsets)
        del arrays
        yield block
        block.arrays.clear()  # the caller still holds `block` while the next one loads


# --- whole-update measurements ------------------------------------------------------------------


def pair_sq_distances(updates: Updates) -> np.ndarray:
    """n×n squared Euclidean distances between whole flattened updates (float64)."""
    n = updates.n
    total = np.zeros((n, n))
    for block in _blocks(updates):
        partial = np.zeros((block.chunks.shape[0], n, n))
        K.pair_sq_distances(block.parts(), n, block.chunks, partial)
        total += K.reduce_chunks(partial)  # blocks in key order: a fixed sequence of adds
    return total + total.T


def sq_distances_to(updates: Updates, z: Sequence[np.ndarray] | None) -> np.ndarray:
    """Each update's squared distance to z (flat float64 per key; None = the origin)."""
    n = updates.n
    total = np.zeros(n)
    for block in _blocks(updates):
        if z is None:
            target = np.zeros(int(block.offsets[-1]))
        else:
            target = np.concatenate([z[k] for k in block.keys]) if block.keys else np.zeros(0)
        partial = np.zeros((block.chunks.shape[0], n))
        K.sq_distances_to(block.parts(), n, block.chunks, block.offsets, target, partial)
        total += K.reduce_chunks(partial)
    return total


def _network(n: int) -> np.ndarray:
    """Batcher's odd-even merge sort for n inputs: the 2^k network with every comparator that
    touches a padding slot (≥ n, conceptually +inf, which never moves) dropped."""
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def coordinatewise(
    updates: Updates, trim: int, weights: Sequence[int]
) -> tuple[list[torch.Tensor], np.ndarray]:
    """Trimmed weighted mean per coordinate (trim = (n-1)//2 with equal weights: the median),
    and how many coordinates each participant's value was kept at."""
    n = updates.n
    shapes = updates.shapes()
    network = _network(n)
    distinct = sorted(set(weights))
    rank = np.array([distinct.index(w) for w in weights], dtype=np.int64)
    w = np.array([float(x) for x in weights])
    used = np.zeros(n, dtype=np.int64)
    out: list[torch.Tensor] = [torch.empty(0)] * len(shapes)
    for block in _blocks(updates):
        flat = np.empty(int(block.offsets[-1]), dtype=np.float32)
        counts = np.zeros((block.chunks.shape[0], n), dtype=np.int64)
        K.trimmed_means(
            block.parts(as_int32=True),
            n,
            block.chunks,
            block.offsets,
            network,
            trim,
            rank,
            w,
            flat,
            counts,
        )
        used += counts.sum(axis=0)
        result = torch.from_numpy(flat)
        for j, k in enumerate(block.keys):
            out[k] = result[int(block.offsets[j]) : int(block.offsets[j + 1])].reshape(shapes[k])
    return out, used


def exact_mean(
    updates: Updates,
    members: Sequence[int],
    weights: Sequence[int],
    out_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """The exact weighted mean (`exact.py`) of some participants' updates, per key."""
    shapes = updates.shapes()
    sizes = [math.prod(s) for s in shapes]
    out: list[torch.Tensor] = [torch.empty(0)] * len(shapes)
    for group in plan_groups(sizes):
        columns = updates.load(group)
        picked = [[column[i] for i in members] for column in columns]
        for k, mean in zip(group, exact_weighted_means(picked, weights, out_dtype), strict=True):
            out[k] = mean.reshape(shapes[k])
        del columns, picked
    return out


def copy_update(updates: Updates, member: int) -> list[torch.Tensor]:
    """One participant's update, bit for bit, as float32 (what Krum outputs)."""
    shapes = updates.shapes()
    sizes = [math.prod(s) for s in shapes]
    out: list[torch.Tensor] = [torch.empty(0)] * len(shapes)
    for group in plan_groups(sizes):
        for k, column in zip(group, updates.load(group), strict=True):
            out[k] = column[member].detach().to(torch.float32).clone().reshape(shapes[k])
    return out


def krum_scores(sq: np.ndarray, f: int) -> list[float]:
    """Each update's Krum score: the sum of its n − f − 2 smallest squared distances to the
    others, added smallest first (a fixed order)."""
    n = sq.shape[0]
    keep = n - f - 2
    scores = []
    for i in range(n):
        nearest = sorted(float(sq[i, j]) for j in range(n) if j != i)[:keep]
        total = 0.0
        for d in nearest:
            total += d
        scores.append(total)
    return scores


def _resultant(apex_sq: np.ndarray, sq: np.ndarray, w: np.ndarray, away: np.ndarray) -> float:
    """|Σ_{i away} w_i·(x_i − a)/|x_i − a||: the other points' pull on an apex a, from squared
    distances alone — (x_i − a)·(x_j − a) = (|x_i − a|² + |x_j − a|² − |x_i − x_j|²) / 2. Every
    term is symmetric in (i, j) and `math.fsum` rounds the exact sum once, so the value does not
    depend on participant order."""
    idx = np.flatnonzero(away)
    if idx.size == 0:
        return 0.0
    d2 = apex_sq[idx]
    a = w[idx] / np.sqrt(d2)
    dot = (d2[:, None] + d2[None, :] - sq[np.ix_(idx, idx)]) * 0.5
    return math.sqrt(max(math.fsum((np.outer(a, a) * dot).ravel().tolist()), 0.0))


def median_vertex(sq: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """The participants at the data point that is the weighted geometric median, if one is
    (None otherwise). Vardi & Zhang's test: x_k minimises Σ w_i|x_i − z| exactly when the pull
    of the others |R_k| is at most the weight sitting at x_k; strictly less makes it the unique
    minimum, so no two points pass and the answer cannot depend on order. Weiszfeld nears such
    a point only linearly, at ratio |R_k|/w_k, and with rounded coefficients stalls short of it.
    Only the data points of least objective (necessary for a minimum) are tested."""
    objective = [math.fsum((w * np.sqrt(sq[:, k])).tolist()) for k in range(len(w))]
    best = min(objective)
    found: np.ndarray | None = None
    for k, value in enumerate(objective):
        if value > best * (1.0 + 1e-9):
            continue
        here = sq[:, k] == 0.0  # the participants whose update is this same point
        if _resultant(sq[:, k], sq, w, ~here) < float(w[here].sum()):
            if found is not None and not bool((found == here).all()):
                return None  # two points pass: a rounding tie; let the iteration decide
            found = here
    return found


def weiszfeld(
    updates: Updates, weights: Sequence[int], max_iter: int, tol: float
) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Weighted geometric median: a data point when Vardi & Zhang's test says the median is
    one (`median_vertex`: then that update itself, 0 steps), else Weiszfeld's iteration from
    the weighted mean, with their modified step should an iterate land on a data point (plain
    Weiszfeld would stay there). Stops when a step moves less than tol × the median distance
    to z (the data's own scale) or after max_iter steps. Returns z (flat float64 per key), the
    final coefficients (each participant's share of the last step) and the steps taken.

    Each step's coefficients are rounded to integers (the largest to 2^20) and the step is the
    exact weighted mean of `exact.py`: every quantity is then independent of participant
    order, and the rounding is far below the stopping tolerance."""
    everyone = range(updates.n)
    w = np.array([float(x) for x in weights])
    sq = pair_sq_distances(updates)
    vertex = median_vertex(sq, w)
    if vertex is not None:
        k = int(np.flatnonzero(vertex)[0])  # all of them hold these same values
        # + 0.0 makes −0.0 into 0.0: coinciding updates that differ only in signed zeros agree
        z = [t.reshape(-1).numpy().astype(np.float64) + 0.0 for t in copy_update(updates, k)]
        return z, np.where(vertex, w, 0.0) / float(w[vertex].sum()), 0
    z = [t.reshape(-1).numpy() for t in exact_mean(updates, everyone, weights, torch.float64)]
    coef = w / w.sum()
    steps = 0
    for steps in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        dist_sq = sq_distances_to(updates, z)
        dist = np.sqrt(dist_sq)
        here = dist <= 1e-12 * max(float(dist.max()), 1e-30)  # z is (at) these data points
        c = w / np.where(here, 1.0, dist)
        if here.any():  # Vardi & Zhang: weigh the point z sits on against the others' pull
            eta = float(w[here].sum())
            pull = _resultant(dist_sq, sq, w, ~here)
            if pull <= eta:
                break  # z is the median
            away = np.where(here, 0.0, c)
            c = np.where(here, w / pull, (1.0 - eta / pull) * away / away.sum())
        coef = c / c.sum()
        top = float(c.max())
        step_w = [max(1, round(float(x) / top * 2**20)) for x in c]
        new = [t.reshape(-1).numpy() for t in exact_mean(updates, everyone, step_w, torch.float64)]
        move = math.sqrt(sum(K.sq_diff(a, b) for a, b in zip(new, z, strict=True)))
        z = new
        if move <= tol * max(statistics.median(float(d) for d in dist), 1e-30):
            break
    return z, coef, steps


def krum_distances(updates: Updates, metric: Literal["euclidean", "cosine"]) -> np.ndarray:
    """Squared Euclidean distances, or cosine distances 1 − cos(x_i, x_j) (from the same
    float64 sums: cos = (|x|² + |y|² − |x − y|²) / 2|x||y|; a zero update is orthogonal to all).
    Cosine ignores length — pair it with `norm_bound` — and sees an update that points against
    the others (sign flips, inner-product manipulation) as far even when it is short."""
    sq = pair_sq_distances(updates)
    if metric == "euclidean":
        return sq
    norms = sq_distances_to(updates, None)
    n = updates.n
    out = np.ones((n, n))
    for i in range(n):
        out[i, i] = 0.0
        for j in range(n):
            if i != j and norms[i] > 0.0 and norms[j] > 0.0:
                cos = (norms[i] + norms[j] - sq[i, j]) / (2.0 * math.sqrt(norms[i] * norms[j]))
                out[i, j] = 1.0 - min(1.0, max(-1.0, cos))
    return out
