"""Trimmed mean: per coordinate, drop the ⌊β·n⌋ lowest and highest values, average the rest."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from hearthnet.fedlearn.rules.base import Rule, RuleRun, beyond, float_param, invalid

if TYPE_CHECKING:
    from hearthnet.fedlearn.aggregation.robust_ops import Updates


def run_coordinatewise(view: Updates, trim: int, weights: Sequence[int], label: str) -> RuleRun:
    """Sort each coordinate's values, drop `trim` per tail, weighted-mean the rest (shared
    with the median, which trims all but the middle)."""
    from hearthnet.fedlearn.aggregation.robust_ops import coordinatewise

    tensors, used = coordinatewise(view, trim, weights)
    total = max(int(used.sum()), 1)
    coords = max(sum(math.prod(s) for s in view.shapes()), 1)
    share = [int(u) / total for u in used]
    reasons = [
        f"value kept at {100.0 * int(u) / coords:.1f}% of coordinates ({label})" for u in used
    ]
    return RuleRun(tensors, share, reasons)


@dataclass(frozen=True)
class TrimmedMean(Rule):
    """Tolerates ⌊β·n⌋ per tail; trims by count (one participant, one vote) and averages the
    kept values with their weights, so the result stays inside the kept values' range."""

    name = "trimmed_mean"
    params = frozenset({"beta"})
    beta: float = 0.2

    @classmethod
    def parse(cls, params: Mapping[str, object]) -> Self:
        """`beta`, the fraction trimmed from each tail, in (0, 0.5)."""
        beta = float_param(params, "beta", 0.2)
        if not 0.0 < beta < 0.5:
            raise invalid("beta (the fraction trimmed from each tail) must be in (0, 0.5)")
        return cls(beta)

    def tolerated(self, n: int) -> int:
        """⌊β·n⌋: as many outliers per tail as are trimmed."""
        return math.floor(self.beta * n)

    def minimum_n(self) -> int:
        """The smallest n at which ⌊β·n⌋ ≥ 1, so at least one value is trimmed per tail."""
        return math.ceil(1.0 / self.beta - 1e-12)

    def check(self, n: int, weights: Sequence[int] | None, minimum: int) -> None:
        """Also refuses an n at which β trims nothing (a plain mean in disguise)."""
        if math.floor(self.beta * n) < 1:
            raise beyond(
                f"trimmed_mean with beta={self.beta} trims nothing from {n} updates; "
                f"it needs n >= {minimum}"
            )
        super().check(n, weights, minimum)

    def run(self, view: Updates, weights: Sequence[int]) -> RuleRun:
        """Trim ⌊β·n⌋ per tail by count, then the weighted mean of what is left."""
        trim = math.floor(self.beta * view.n)
        return run_coordinatewise(view, trim, weights, f"{self.name}, {trim} trimmed per tail")
