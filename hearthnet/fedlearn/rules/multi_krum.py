"""Multi-Krum: the weighted mean of the m best Krum-scored updates (default n − f)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from hearthnet.fedlearn.rules.base import beyond, int_param, invalid, required_int
from hearthnet.fedlearn.rules.krum import Krum, parse_metric

if TYPE_CHECKING:
    import torch

    from hearthnet.fedlearn.aggregation.robust_ops import Updates


@dataclass(frozen=True)
class MultiKrum(Krum):
    """Tolerates f with n ≥ 2f + 3 and 1 ≤ m ≤ n − f; averages the selected with weights."""

    name = "multi_krum"
    params = frozenset({"f", "m", "metric"})
    m: int | None = None

    @classmethod
    def parse(cls, params: Mapping[str, object]) -> Self:
        """`f`, `metric` and the optional `m` (updates averaged, at least 1)."""
        f = required_int(params, "f", 1)
        m = int_param(params, "m", None)
        if m is not None and m < 1:
            raise invalid("m (updates averaged by multi_krum) must be at least 1")
        return cls(f=f, metric=parse_metric(params), m=m)

    def check(self, n: int, weights: Sequence[int] | None, minimum: int) -> None:
        """Also refuses `m` > n − f, which would let a Byzantine update into the mean."""
        super().check(n, weights, minimum)
        if self.m is not None and self.m > n - self.f:
            raise beyond(f"multi_krum needs m <= n - f = {n - self.f}; got m={self.m}")

    def kept(self, n: int) -> int:
        """`m`, or n − f when it is not set."""
        return self.m or n - self.f

    def combine(
        self, view: Updates, chosen: list[int], weights: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[float]]:
        """The weighted mean of the chosen updates; shares are their weights among the chosen."""
        from hearthnet.fedlearn.aggregation.robust_ops import exact_mean

        cw = [weights[i] for i in chosen]
        share = [weights[i] / sum(cw) if i in chosen else 0.0 for i in range(view.n)]
        return exact_mean(view, chosen, cw), share
