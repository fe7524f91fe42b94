"""Coordinate-wise median. Tolerates f < n/2; ignores weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from hearthnet.fedlearn.rules.base import Rule, RuleRun, int_param
from hearthnet.fedlearn.rules.trimmed_mean import run_coordinatewise

if TYPE_CHECKING:
    from hearthnet.fedlearn.aggregation.robust_ops import Updates


@dataclass(frozen=True)
class Median(Rule):
    """The per-coordinate median (the trimmed mean that keeps only the middle); `f` optionally
    states the tolerance the round needs (n ≥ 2f + 1)."""

    name = "median"
    params = frozenset({"f"})
    f: int | None = None

    @classmethod
    def parse(cls, params: Mapping[str, object]) -> Self:
        """The optional `f` the round states it needs."""
        return cls(int_param(params, "f", None))

    def tolerated(self, n: int) -> int:
        """Just under half (or the stated `f`): the median holds while honest updates are a
        majority."""
        return (n - 1) // 2 if self.f is None else self.f

    def minimum_n(self) -> int:
        """At least 3, and 2f + 1 when `f` is stated."""
        return max(3, 2 * (self.f or 0) + 1)

    def run(self, view: Updates, weights: Sequence[int]) -> RuleRun:
        """The coordinate-wise median, one vote per participant (weights ignored)."""
        return run_coordinatewise(view, (view.n - 1) // 2, [1] * view.n, self.name)
