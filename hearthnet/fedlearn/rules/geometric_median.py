"""Geometric median (Weiszfeld): minimises the weighted sum of distances to the updates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from hearthnet.fedlearn.rules.base import Rule, RuleRun, beyond, float_param, invalid, required_int

if TYPE_CHECKING:
    from hearthnet.fedlearn.aggregation.robust_ops import Updates

MAX_ITER_CEILING = 1000


@dataclass(frozen=True)
class GeometricMedian(Rule):
    """Tolerates f by count (n ≥ 2f + 1) and by weight: refused when the f heaviest
    participants could hold half the weight, since they alone could move it."""

    name = "geometric_median"
    params = frozenset({"f", "max_iter", "tol"})
    f: int = 1
    max_iter: int = 100
    tol: float = 1e-6

    @classmethod
    def parse(cls, params: Mapping[str, object]) -> Self:
        """`f`, `max_iter` (at most MAX_ITER_CEILING) and `tol` (in (0, 1))."""
        f = required_int(params, "f", 1)
        max_iter = required_int(params, "max_iter", 100)
        if not 1 <= max_iter <= MAX_ITER_CEILING:
            raise invalid(f"max_iter must be in [1, {MAX_ITER_CEILING}]")
        tol = float_param(params, "tol", 1e-6)
        if not 0.0 < tol < 1.0:
            raise invalid("tol (relative step at which Weiszfeld stops) must be in (0, 1)")
        return cls(f, max_iter, tol)

    def tolerated(self, n: int) -> int:
        """The stated `f`: the median's breakdown point is half, so f < n/2 holds by `minimum_n`."""
        return self.f

    def minimum_n(self) -> int:
        """n ≥ 2f + 1, so honest updates are a majority."""
        return 2 * self.f + 1

    def check(self, n: int, weights: Sequence[int] | None, minimum: int) -> None:
        """Also refuses when the f heaviest participants hold half the weight: the weighted
        median would be theirs."""
        super().check(n, weights, minimum)
        if weights is not None and self.f:
            heavy = sum(sorted(weights, reverse=True)[: self.f])
            if 2 * heavy >= sum(weights):
                raise beyond(
                    f"geometric_median: the {self.f} heaviest participants hold half the "
                    "weight or more, so they alone could move it"
                )

    def run(self, view: Updates, weights: Sequence[int]) -> RuleRun:
        """Weiszfeld's iteration; each member's share is its final Weiszfeld coefficient."""
        import torch

        from hearthnet.fedlearn.aggregation.robust_ops import weiszfeld

        z, coef, steps = weiszfeld(view, weights, self.max_iter, self.tol)
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
        return RuleRun(tensors, share, reasons)
