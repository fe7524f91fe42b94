"""Byzantine-robust aggregation rules (DESIGN.md §4 "Pluggable rules").

One engine serves the functional entry point `aggregate(rule, updates, weights, **params)` and
the round aggregator: both describe their inputs as `Updates` (n participants' tensors, key by
key, loaded a block of keys at a time so memory stays bounded), and `run_rule` returns the
aggregate plus a verdict per participant for the audit record.

Rules and what they tolerate (the README's table; `RuleSpec.check` refuses inputs beyond it with
`fedlearn_tolerance_exceeded` — never a silent, undefended aggregate):

| rule              | tolerated f (Byzantine participants)  | condition checked             |
|-------------------|----------------------------------------|-------------------------------|
| fedavg            | 0                                      | —                             |
| trimmed_mean β    | ⌊β·n⌋ per tail                         | ⌊β·n⌋ ≥ 1 (0 < β < ½)         |
| median            | f < n/2                                | n ≥ 2f + 1, n ≥ 3             |
| krum f            | f                                      | n ≥ 2f + 3                    |
| multi_krum f, m   | f                                      | n ≥ 2f + 3, 1 ≤ m ≤ n − f     |
| geometric_median f| f, by count and by weight              | n ≥ 2f + 1, f heaviest < ½ Σw |
| norm_bound (pre-filter, any rule) | updates > bound × median norm | n ≥ 3            |

Krum-family rules, the geometric median and the norm bound see the whole flattened update;
trimmed mean and median work coordinate by coordinate. How weights (capped `num_samples`, times
a reputation influence when the manifest asks) enter: fedavg and multi_krum average with them;
trimmed mean trims by count — one participant, one vote — and averages the kept values with
them, so the result stays inside the kept values' range whatever the weights; median, Krum's
selection and the norm bound ignore them; the geometric median minimises the weighted sum of
distances, so it is refused when the f heaviest participants could hold half the weight.

Deterministic (DESIGN.md §4): the kernels (`robust_kernels.py`) sum in fixed orders without
fast-math; coordinate-wise rules sort each coordinate's values first; Krum scores are sums of
sorted distances and ties go to the earlier participant (callers pass participants in NodeID
order); means of selected updates go through the exact kernel of `exact.py`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from numba.typed import List as TypedList

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn import robust_kernels as K
from hearthnet.fedlearn.exact import all_finite, chunk_table, exact_weighted_means, plan_groups

RULES = ("fedavg", "trimmed_mean", "median", "krum", "multi_krum", "geometric_median")
NormAction = Literal["clip", "drop"]
Action = Literal["kept", "down_weighted", "excluded"]

_COMMON = frozenset({"norm_bound", "norm_action", "reputation_weighted"})
_PARAMS: dict[str, frozenset[str]] = {
    "fedavg": frozenset(),
    "trimmed_mean": frozenset({"beta"}),
    "median": frozenset({"f"}),
    "krum": frozenset({"f"}),
    "multi_krum": frozenset({"f", "m"}),
    "geometric_median": frozenset({"f", "max_iter", "tol"}),
}
MAX_UPDATES = 255  # the trimmed-mean kernel tags each entry with an 8-bit participant index
MAX_ITER_CEILING = 1000
# A participant whose share of the output is below these fractions of an equal share is
# reported as excluded / down-weighted in the audit record.
EXCLUDED_BELOW = 0.25
DOWN_WEIGHTED_BELOW = 0.75


def _invalid(message: str) -> HearthnetError:
    return HearthnetError(ErrorCode.MANIFEST_INVALID, f"aggregation: {message}")


def _beyond(message: str) -> HearthnetError:
    return HearthnetError(ErrorCode.FEDLEARN_TOLERANCE_EXCEEDED, message)


def _int_param(params: Mapping[str, object], name: str, default: int | None) -> int | None:
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(f"{name} must be a non-negative integer")
    return value


def _float_param(params: Mapping[str, object], name: str, default: float | None) -> float | None:
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"{name} must be a finite number")
    return float(value)


@dataclass(frozen=True)
class RuleSpec:
    """A rule and its parameters, validated (manifest `aggregation` = rule + params)."""

    rule: str
    beta: float = 0.2
    f: int | None = None
    m: int | None = None
    max_iter: int = 100
    tol: float = 1e-6
    norm_bound: float | None = None
    norm_action: NormAction = "clip"
    reputation_weighted: bool = False

    @classmethod
    def parse(cls, rule: str, params: Mapping[str, object] | None = None) -> RuleSpec:
        """`manifest_invalid` for an unknown rule, parameter or value."""
        params = dict(params or {})
        if rule not in _PARAMS:
            raise _invalid(f"unknown rule {rule!r}; one of {', '.join(RULES)}")
        unknown = set(params) - _PARAMS[rule] - _COMMON
        if unknown:
            raise _invalid(f"{rule} takes no parameter {', '.join(sorted(unknown))}")
        beta = _float_param(params, "beta", 0.2)
        assert beta is not None
        if not 0.0 < beta < 0.5:
            raise _invalid("beta (the fraction trimmed from each tail) must be in (0, 0.5)")
        default_f = 1 if rule in ("krum", "multi_krum", "geometric_median") else None
        f = _int_param(params, "f", default_f)
        m = _int_param(params, "m", None)
        if m is not None and m < 1:
            raise _invalid("m (updates averaged by multi_krum) must be at least 1")
        max_iter = _int_param(params, "max_iter", 100)
        assert max_iter is not None
        if not 1 <= max_iter <= MAX_ITER_CEILING:
            raise _invalid(f"max_iter must be in [1, {MAX_ITER_CEILING}]")
        tol = _float_param(params, "tol", 1e-6)
        assert tol is not None
        if not 0.0 < tol < 1.0:
            raise _invalid("tol (relative step at which Weiszfeld stops) must be in (0, 1)")
        bound = _float_param(params, "norm_bound", None)
        if bound is not None and bound < 1.0:
            raise _invalid("norm_bound is a multiple of the median norm and must be >= 1")
        action = params.get("norm_action", "clip")
        if action not in ("clip", "drop"):
            raise _invalid("norm_action must be 'clip' or 'drop'")
        weighted = params.get("reputation_weighted", False)
        if not isinstance(weighted, bool):
            raise _invalid("reputation_weighted must be true or false")
        return cls(rule, beta, f, m, max_iter, tol, bound, action, weighted)

    @property
    def robust(self) -> bool:
        return self.rule != "fedavg" or self.norm_bound is not None

    def tolerated(self, n: int) -> int:
        """How many Byzantine participants the rule withstands among n (by count)."""
        if self.rule == "trimmed_mean":
            return math.floor(self.beta * n)
        if self.rule == "median":
            return (n - 1) // 2 if self.f is None else self.f
        if self.rule in ("krum", "multi_krum", "geometric_median"):
            assert self.f is not None
            return self.f
        return 0

    def minimum_n(self) -> int:
        """The fewest updates the rule accepts; the manifest's min_participants must reach it."""
        if self.rule == "trimmed_mean":
            return math.ceil(1.0 / self.beta - 1e-12)
        need = 1
        if self.rule == "median":
            need = max(3, 2 * (self.f or 0) + 1)
        elif self.rule in ("krum", "multi_krum"):
            need = 2 * (self.f or 0) + 3
        elif self.rule == "geometric_median":
            need = 2 * (self.f or 0) + 1
        if self.norm_bound is not None:
            need = max(need, 3)
        return need

    def check(self, n: int, weights: Sequence[int] | None = None) -> None:
        """`fedlearn_tolerance_exceeded` when n updates (with these weights) are beyond what the
        rule can defend; the message names the condition."""
        if n > MAX_UPDATES:
            raise _beyond(f"at most {MAX_UPDATES} updates can be aggregated")
        if self.rule == "trimmed_mean" and math.floor(self.beta * n) < 1:
            raise _beyond(
                f"trimmed_mean with beta={self.beta} trims nothing from {n} updates; "
                f"it needs n >= {self.minimum_n()}"
            )
        if n < self.minimum_n():
            raise _beyond(
                f"{self.rule} tolerating f={self.tolerated(max(n, 1))} needs n >= "
                f"{self.minimum_n()}; got {n}"
            )
        if self.rule == "multi_krum" and self.m is not None:
            assert self.f is not None
            if self.m > n - self.f:
                raise _beyond(f"multi_krum needs m <= n - f = {n - self.f}; got m={self.m}")
        if self.rule == "geometric_median" and weights is not None and self.f:
            heavy = sum(sorted(weights, reverse=True)[: self.f])
            if 2 * heavy >= sum(weights):
                raise _beyond(
                    f"geometric_median: the {self.f} heaviest participants hold half the "
                    "weight or more, so they alone could move it"
                )


# --- inputs -----------------------------------------------------------------------------------


class Updates(Protocol):
    """n participants' updates, key by key; `load` returns, for each asked key, the n tensors
    in participant order (each the key's shape)."""

    @property
    def n(self) -> int: ...

    def shapes(self) -> list[torch.Size]: ...

    def load(self, keys: Sequence[int]) -> list[list[torch.Tensor]]: ...


@dataclass(frozen=True)
class TensorUpdates:
    """Same-shape tensors as a one-key `Updates` (the functional API's input)."""

    tensors: Sequence[torch.Tensor]

    @property
    def n(self) -> int:
        return len(self.tensors)

    def shapes(self) -> list[torch.Size]:
        return [self.tensors[0].shape]

    def load(self, keys: Sequence[int]) -> list[list[torch.Tensor]]:
        return [list(self.tensors) for _ in keys]


@dataclass(frozen=True)
class _Subset:
    """Some participants of `base`, each optionally scaled (a norm clip)."""

    base: Updates
    members: tuple[int, ...]
    scales: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.members)

    def shapes(self) -> list[torch.Size]:
        return self.base.shapes()

    def load(self, keys: Sequence[int]) -> list[list[torch.Tensor]]:
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
    sizes: list[int]
    arrays: list[np.ndarray]  # keeps the views alive while the kernels read them
    chunks: np.ndarray
    offsets: np.ndarray

    def parts(self, as_int32: bool = False) -> TypedList[np.ndarray]:
        return TypedList([a.view(np.int32) for a in self.arrays] if as_int32 else self.arrays)


def _f32(t: torch.Tensor) -> np.ndarray:
    flat = t.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    return flat.contiguous().numpy()


def _blocks(updates: Updates) -> Iterator[_Block]:
    """One block of keys at a time; a block's tensors are released before the next loads, so
    memory holds participants × one block (DESIGN.md §4 streaming)."""
    sizes = [math.prod(s) for s in updates.shapes()]
    for group in plan_groups(sizes):
        arrays = [_f32(t) for column in updates.load(group) for t in column]
        group_sizes = [sizes[k] for k in group]
        offsets = np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64)
        block = _Block(group, group_sizes, arrays, chunk_table(group_sizes), offsets)
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


# --- outcome ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a rule did with one participant's update, for the audit record. `influence` is its
    share of the output relative to an equal share (1.0 = one n-th)."""

    action: Action
    influence: float
    reason: str
    deviation: float = 0.0  # distance to the aggregate / the median participant's distance


@dataclass
class Outcome:
    tensors: list[torch.Tensor]  # per key, the key's shape, float32
    verdicts: list[Verdict]
    notes: dict[str, float | int] = field(default_factory=dict)


def _action(influence: float) -> Action:
    if influence < EXCLUDED_BELOW:
        return "excluded"
    if influence < DOWN_WEIGHTED_BELOW:
        return "down_weighted"
    return "kept"


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


def _weiszfeld(
    updates: Updates, weights: Sequence[int], max_iter: int, tol: float
) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Weighted geometric median by Weiszfeld's iteration from the weighted mean; stops when a
    step moves less than tol × the median distance to z (the data's own scale) or after
    max_iter steps. Returns z (flat float64 per key), the final coefficients
    (w_i / |x_i − z|, normalised) and the steps taken.

    Each step's coefficients are rounded to integers (the largest to 2^20) and the step is the
    exact weighted mean of `exact.py`: every quantity is then independent of participant
    order, and the rounding is far below the stopping tolerance."""
    everyone = range(updates.n)
    w = np.array([float(x) for x in weights])
    z = [t.reshape(-1).numpy() for t in exact_mean(updates, everyone, weights, torch.float64)]
    coef = w / w.sum()
    steps = 0
    for steps in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        dist = np.sqrt(sq_distances_to(updates, z))
        floor = 1e-12 * max(float(dist.max()), 1e-30)
        c = w / np.maximum(dist, floor)
        coef = c / c.sum()
        top = float(c.max())
        step_w = [max(1, round(float(x) / top * 2**20)) for x in c]
        new = [t.reshape(-1).numpy() for t in exact_mean(updates, everyone, step_w, torch.float64)]
        move = math.sqrt(sum(K.sq_diff(a, b) for a, b in zip(new, z, strict=True)))
        z = new
        if move <= tol * max(statistics.median(float(d) for d in dist), 1e-30):
            break
    return z, coef, steps


# --- the rules ----------------------------------------------------------------------------------


def _norm_filter(spec: RuleSpec, updates: Updates) -> tuple[Updates, list[int], dict[int, Verdict]]:
    """The norm bound: updates longer than bound × the median norm are clipped to it or dropped.
    Returns the updates the rule then sees, their indices in `updates`, and verdicts."""
    n = updates.n
    members = list(range(n))
    if spec.norm_bound is None:
        return updates, members, {}
    if n < 3:
        raise _beyond(f"norm_bound needs n >= 3 (a median norm); got {n}")
    norms = np.sqrt(sq_distances_to(updates, None))
    median = statistics.median(float(x) for x in norms)
    bound = spec.norm_bound * median
    over = [i for i in range(n) if median > 0.0 and float(norms[i]) > bound]
    verdicts: dict[int, Verdict] = {}
    for i in over:
        ratio = float(norms[i]) / median
        if spec.norm_action == "drop":
            why = f"norm {ratio:.3g}× the median norm > bound {spec.norm_bound:g}: dropped"
            verdicts[i] = Verdict("excluded", 0.0, why)
        else:
            why = f"norm {ratio:.3g}× the median norm clipped to {spec.norm_bound:g}×"
            verdicts[i] = Verdict("down_weighted", 1.0, why)
    if spec.norm_action == "drop":
        members = [i for i in range(n) if i not in verdicts]
        return _Subset(updates, tuple(members), (1.0,) * len(members)), members, verdicts
    scales = tuple(bound / float(norms[i]) if i in verdicts else 1.0 for i in range(n))
    return _Subset(updates, tuple(members), scales), members, verdicts


def run_rule(
    spec: RuleSpec, updates: Updates, weights: Sequence[int], audit: bool = True
) -> Outcome:
    """Aggregate `updates` (participants in their canonical order) with `spec`. Weights are
    positive integers (capped num_samples × influence). Inputs must be finite. `audit` adds
    each participant's deviation (one more pass over the updates)."""
    n = updates.n
    if n == 0 or len(weights) != n or any(w < 1 for w in weights):
        raise HearthnetError(
            ErrorCode.FEDLEARN_AGGREGATION_FAILED, "one positive integer weight per update"
        )
    view, members, filtered = _norm_filter(spec, updates)
    w = [weights[i] for i in members]
    spec.check(view.n, w)
    share: list[float]  # per member, its share of the output (sums to 1)
    reasons: list[str]
    notes: dict[str, float | int] = {}
    if spec.rule == "fedavg":
        tensors = exact_mean(view, range(view.n), w)
        share = [x / sum(w) for x in w]
        reasons = ["weighted mean"] * view.n
    elif spec.rule in ("trimmed_mean", "median"):
        if spec.rule == "median":
            trim, rule_w = (view.n - 1) // 2, [1] * view.n
        else:
            trim, rule_w = math.floor(spec.beta * view.n), w
        tensors, used = coordinatewise(view, trim, rule_w)
        total = max(int(used.sum()), 1)
        coords = max(sum(math.prod(s) for s in view.shapes()), 1)
        share = [int(u) / total for u in used]
        reasons = [
            f"value kept at {100.0 * int(u) / coords:.1f}% of coordinates"
            f" ({spec.rule}{'' if spec.rule == 'median' else f', {trim} trimmed per tail'})"
            for u in used
        ]
        notes["trimmed_per_tail"] = trim
    elif spec.rule in ("krum", "multi_krum"):
        assert spec.f is not None
        scores = krum_scores(pair_sq_distances(view), spec.f)
        ranked = sorted(range(view.n), key=lambda i: (scores[i], i))
        m = 1 if spec.rule == "krum" else (spec.m or view.n - spec.f)
        chosen = sorted(ranked[:m])
        if spec.rule == "krum":
            tensors = copy_update(view, chosen[0])
            share = [1.0 if i == chosen[0] else 0.0 for i in range(view.n)]
        else:
            cw = [w[i] for i in chosen]
            tensors = exact_mean(view, chosen, cw)
            share = [w[i] / sum(cw) if i in chosen else 0.0 for i in range(view.n)]
        position = {i: r + 1 for r, i in enumerate(ranked)}
        reasons = [
            f"krum score rank {position[i]} of {view.n}; "
            f"{'selected' if i in chosen else 'not selected'} ({m} kept, f={spec.f})"
            for i in range(view.n)
        ]
        notes["selected"] = m
    else:  # geometric_median
        z, coef, steps = _weiszfeld(view, w, spec.max_iter, spec.tol)
        shapes = view.shapes()
        tensors = [
            torch.from_numpy(zk).to(torch.float32).reshape(shapes[k]) for k, zk in enumerate(z)
        ]
        share = [float(c) for c in coef]
        reasons = [f"Weiszfeld weight {float(c):.3g} after {steps} steps" for c in coef]
        notes["weiszfeld_steps"] = steps
    verdicts = _verdicts(n, members, share, reasons, filtered)
    if audit:
        verdicts = _with_deviation(updates, tensors, verdicts)
    return Outcome(tensors, verdicts, notes)


def _verdicts(
    n: int,
    members: list[int],
    share: list[float],
    reasons: list[str],
    filtered: dict[int, Verdict],
) -> list[Verdict]:
    out: list[Verdict] = []
    where = {p: j for j, p in enumerate(members)}
    for i in range(n):
        if i not in where:
            out.append(filtered[i])
            continue
        influence = share[where[i]] * n
        reason = reasons[where[i]]
        action = _action(influence)
        if i in filtered:  # clipped, then aggregated
            reason = f"{filtered[i].reason}; {reason}"
            action = "excluded" if action == "excluded" else "down_weighted"
        out.append(Verdict(action, round(influence, 6), reason[:256]))
    return out


def fedavg_verdicts(
    updates: Updates, tensors: Sequence[torch.Tensor], weights: Sequence[int]
) -> list[Verdict]:
    """The audit of a plain weighted mean computed elsewhere (the exact FedAvg path)."""
    total = sum(weights)
    verdicts = [
        Verdict("kept", round(len(weights) * w / total, 6), f"weighted mean, weight {w} of {total}")
        for w in weights
    ]
    return _with_deviation(updates, tensors, verdicts)


def _with_deviation(
    updates: Updates, tensors: Sequence[torch.Tensor], verdicts: list[Verdict]
) -> list[Verdict]:
    """Each original update's distance to the aggregate, over the median such distance (the
    reputation signal: scale-free, so honest spread sits near 1)."""
    z = [t.detach().reshape(-1).to(torch.float64).numpy() for t in tensors]
    dist = np.sqrt(sq_distances_to(updates, z))
    median = statistics.median(float(d) for d in dist)
    out = []
    for v, d in zip(verdicts, dist, strict=True):
        dev = 0.0 if float(d) == 0.0 else min(float(d) / median, 1e6) if median > 0 else 1e6
        out.append(Verdict(v.action, v.influence, v.reason, round(dev, 6)))
    return out


def aggregate(
    rule: str,
    updates: Sequence[torch.Tensor],
    weights: Sequence[int] | None = None,
    **params: object,
) -> torch.Tensor:
    """Aggregate same-shape tensors with a named rule, e.g.
    `aggregate("trimmed_mean", updates, beta=0.2)` or `aggregate("krum", updates, f=2)`.

    Weights are positive integers (default: all 1). `manifest_invalid` for a bad rule or
    parameter, `fedlearn_tolerance_exceeded` beyond the rule's bound,
    `fedlearn_aggregation_failed` for non-finite or mismatched inputs."""
    spec = RuleSpec.parse(rule, params)
    if not updates:
        raise HearthnetError(ErrorCode.FEDLEARN_AGGREGATION_FAILED, "nothing to aggregate")
    shape = updates[0].shape
    for t in updates:
        if t.shape != shape:
            raise HearthnetError(ErrorCode.FEDLEARN_AGGREGATION_FAILED, "updates differ in shape")
        if not all_finite(t):
            raise HearthnetError(ErrorCode.FEDLEARN_AGGREGATION_FAILED, "an update is not finite")
    w = list(weights) if weights is not None else [1] * len(updates)
    return run_rule(spec, TensorUpdates(list(updates)), w, audit=False).tensors[0]
