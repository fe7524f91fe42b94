"""Krum: the update closest to its n − f − 2 nearest neighbours. Tolerates f with n ≥ 2f + 3."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Self

from hearthnet.fedlearn.rules.base import Rule, RuleRun, invalid, required_int

if TYPE_CHECKING:
    import torch

    from hearthnet.fedlearn.aggregation.robust_ops import Updates

Metric = Literal["euclidean", "cosine"]


def parse_metric(params: Mapping[str, object]) -> Metric:
    """`euclidean` (default) or `cosine` (ignores length: pair it with `norm_bound`)."""
    metric = params.get("metric", "euclidean")
    if metric == "euclidean" or metric == "cosine":
        return metric
    raise invalid("metric must be 'euclidean' or 'cosine'")


@dataclass(frozen=True)
class Krum(Rule):
    """Selects one update by Krum score (ties to the earlier participant); ignores weights."""

    name = "krum"
    params = frozenset({"f", "metric"})
    f: int = 1
    metric: Metric = "euclidean"

    @classmethod
    def parse(cls, params: Mapping[str, object]) -> Self:
        """`f` and the distance `metric`."""
        f = required_int(params, "f", 1)
        return cls(f=f, metric=parse_metric(params))

    def tolerated(self, n: int) -> int:
        """The stated `f`: Krum's score counts on n − f − 2 honest neighbours."""
        return self.f

    def minimum_n(self) -> int:
        """n ≥ 2f + 3, Krum's bound for the score to favour an honest update."""
        return 2 * self.f + 3

    def kept(self, n: int) -> int:
        """How many of the best-scored updates go into the output."""
        return 1

    def combine(
        self, view: Updates, chosen: list[int], weights: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[float]]:
        """The output from the chosen members, and each member's share of it."""
        from hearthnet.fedlearn.aggregation.robust_ops import copy_update

        share = [1.0 if i == chosen[0] else 0.0 for i in range(view.n)]
        return copy_update(view, chosen[0]), share

    def run(self, view: Updates, weights: Sequence[int]) -> RuleRun:
        """Score every update, keep the `kept(n)` best (ties to the earlier participant) and
        combine them."""
        from hearthnet.fedlearn.aggregation.robust_ops import krum_distances, krum_scores

        scores = krum_scores(krum_distances(view, self.metric), self.f)
        ranked = sorted(range(view.n), key=lambda i: (scores[i], i))
        m = self.kept(view.n)
        chosen = sorted(ranked[:m])
        tensors, share = self.combine(view, chosen, weights)
        position = {i: r + 1 for r, i in enumerate(ranked)}
        reasons = [
            f"krum score rank {position[i]} of {view.n}; "
            f"{'selected' if i in chosen else 'not selected'} ({m} kept, f={self.f}, "
            f"{self.metric})"
            for i in range(view.n)
        ]
        return RuleRun(tensors, share, reasons)
