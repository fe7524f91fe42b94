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
| krum f (metric)   | f                                      | n ≥ 2f + 3                    |
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.exact import all_finite
from hearthnet.fedlearn.robust_ops import (
    Subset,
    TensorUpdates,
    Updates,
    coordinatewise,
    copy_update,
    exact_mean,
    krum_scores,
    pair_sq_distances,
    sq_distances_to,
    weiszfeld,
)

RULES = ("fedavg", "trimmed_mean", "median", "krum", "multi_krum", "geometric_median")
NormAction = Literal["clip", "drop"]
Metric = Literal["euclidean", "cosine"]
# `clipped`: outside the norm bound, scaled down to it, then aggregated (clip mode; drop mode
# reports `excluded`) — said apart from `down_weighted`, which is the rule's own doing
Action = Literal["kept", "down_weighted", "clipped", "excluded"]

_COMMON = frozenset({"norm_bound", "norm_action", "reputation_weighted"})
_PARAMS: dict[str, frozenset[str]] = {
    "fedavg": frozenset(),
    "trimmed_mean": frozenset({"beta"}),
    "median": frozenset({"f"}),
    "krum": frozenset({"f", "metric"}),
    "multi_krum": frozenset({"f", "m", "metric"}),
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
    metric: Metric = "euclidean"

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
        metric = params.get("metric", "euclidean")
        if metric not in ("euclidean", "cosine"):
            raise _invalid("metric must be 'euclidean' or 'cosine'")
        return cls(rule, beta, f, m, max_iter, tol, bound, action, weighted, metric)

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


def _action(influence: float) -> Action:
    if influence < EXCLUDED_BELOW:
        return "excluded"
    if influence < DOWN_WEIGHTED_BELOW:
        return "down_weighted"
    return "kept"


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
            verdicts[i] = Verdict("clipped", 1.0, why)
    if spec.norm_action == "drop":
        members = [i for i in range(n) if i not in verdicts]
        return Subset(updates, tuple(members), (1.0,) * len(members)), members, verdicts
    scales = tuple(bound / float(norms[i]) if i in verdicts else 1.0 for i in range(n))
    return Subset(updates, tuple(members), scales), members, verdicts


def _krum_distances(updates: Updates, metric: Metric) -> np.ndarray:
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
    elif spec.rule in ("krum", "multi_krum"):
        assert spec.f is not None
        scores = krum_scores(_krum_distances(view, spec.metric), spec.f)
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
            f"{'selected' if i in chosen else 'not selected'} ({m} kept, f={spec.f}, "
            f"{spec.metric})"
            for i in range(view.n)
        ]
    else:  # geometric_median
        z, coef, steps = weiszfeld(view, w, spec.max_iter, spec.tol)
        shapes = view.shapes()
        tensors = [
            torch.from_numpy(zk).to(torch.float32).reshape(shapes[k]) for k, zk in enumerate(z)
        ]
        share = [float(c) for c in coef]
        if steps == 0:  # the median is a data point (Vardi–Zhang test, `robust_ops.weiszfeld`)
            reasons = [
                "the median is this update" if c > 0 else "the median is another's update"
                for c in coef
            ]
        else:
            reasons = [f"Weiszfeld weight {float(c):.3g} after {steps} steps" for c in coef]
    verdicts = _verdicts(n, members, share, reasons, filtered)
    if audit:
        verdicts = _with_deviation(updates, tensors, verdicts)
    return Outcome(tensors, verdicts)


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
        if i in filtered:  # clipped, then aggregated: excluded only if the rule excluded it too
            reason = f"{filtered[i].reason}; {reason}"
            action = "excluded" if action == "excluded" else "clipped"
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
