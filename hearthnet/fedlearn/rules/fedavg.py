"""FedAvg: the weighted mean. Tolerates no Byzantine participant."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hearthnet.fedlearn.rules.base import Rule, RuleRun

if TYPE_CHECKING:
    from hearthnet.fedlearn.aggregation.robust_ops import Updates


@dataclass(frozen=True)
class FedAvg(Rule):
    """The exact weighted mean (with a norm bound, the robust engine's path; without, the
    aggregator's exact FedAvg path)."""

    name = "fedavg"
    robust = False

    def run(self, view: Updates, weights: Sequence[int]) -> RuleRun:
        """The exact weighted mean of all updates; each member's share is its weight."""
        from hearthnet.fedlearn.aggregation.robust_ops import exact_mean

        tensors = exact_mean(view, range(view.n), weights)
        share = [x / sum(weights) for x in weights]
        return RuleRun(tensors, share, ["weighted mean"] * view.n)
