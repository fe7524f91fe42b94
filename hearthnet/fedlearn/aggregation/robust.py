"""The robust aggregation engine: the norm-bound pre-filter, a rule's run, and the audit.

Each rule is one class under `fedlearn/rules/` (its parameters, bound and numeric run); this
module runs whichever the manifest names.

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

Deterministic (docs/decisions.md): the kernels (`robust_kernels.py`) sum in fixed orders without
fast-math; coordinate-wise rules sort each coordinate's values first; Krum scores are sums of
sorted distances and ties go to the earlier participant (callers pass participants in NodeID
order); means of selected updates go through the exact kernel of `exact.py`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.exact import all_finite
from hearthnet.fedlearn.aggregation.robust_ops import (
    Subset,
    TensorUpdates,
    Updates,
    sq_distances_to,
)
from hearthnet.fedlearn.rules.base import beyond
from hearthnet.fedlearn.rules.spec import RuleSpec

# `clipped`: outside the norm bound, scaled down to it, then aggregated (clip mode; drop mode
# reports `excluded`) — said apart from `down_weighted`, which is the rule's own doing
Action = Literal["kept", "down_weighted", "clipped", "excluded"]

# A participant whose share of the output is below these fractions of an equal share is
# reported as excluded / down-weighted in the audit record.
EXCLUDED_BELOW = 0.25
DOWN_WEIGHTED_BELOW = 0.75


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
    """What a rule run produced: the aggregated tensors and a verdict per participant for the
    audit."""

    tensors: list[torch.Tensor]  # per key, the key's shape, float32
    verdicts: list[Verdict]


def _action(influence: float) -> Action:
    if influence < EXCLUDED_BELOW:
        return "excluded"
    if influence < DOWN_WEIGHTED_BELOW:
        return "down_weighted"
    return "kept"


# --- the engine ---------------------------------------------------------------------------------


def _norm_filter(spec: RuleSpec, updates: Updates) -> tuple[Updates, list[int], dict[int, Verdict]]:
    """The norm bound: updates longer than bound × the median norm are clipped to it or dropped.
    Returns the updates the rule then sees, their indices in `updates`, and verdicts."""
    n = updates.n
    members = list(range(n))
    if spec.norm_bound is None:
        return updates, members, {}
    if n < 3:
        raise beyond(f"norm_bound needs n >= 3 (a median norm); got {n}")
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
    result = spec.impl.run(view, w)
    verdicts = _verdicts(n, members, result.share, result.reasons, filtered)
    if audit:
        verdicts = _with_deviation(updates, result.tensors, verdicts)
    return Outcome(result.tensors, verdicts)


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
