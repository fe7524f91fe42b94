"""A manifest's `aggregation` (rule + params) parsed into a rule and the options every rule
shares: the norm bound pre-filter and reputation weighting. Light: no torch, no numba."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from hearthnet.fedlearn.rules.base import Rule, beyond, float_param, invalid
from hearthnet.fedlearn.rules.registry import REGISTRY, RULES

NormAction = Literal["clip", "drop"]
COMMON = ("norm_bound", "norm_action", "reputation_weighted")  # options every rule takes
MAX_UPDATES = 255  # the trimmed-mean kernel tags each entry with an 8-bit participant index


def parameter_names() -> list[str]:
    """Every parameter some rule takes, then the common ones (for help text)."""
    names: list[str] = []
    for rule_cls in REGISTRY.values():
        names += [p for p in sorted(rule_cls.params) if p not in names]
    return names + list(COMMON)


@dataclass(frozen=True)
class RuleSpec:
    """A rule and its parameters, validated (manifest `aggregation` = rule + params)."""

    impl: Rule
    norm_bound: float | None = None
    norm_action: NormAction = "clip"
    reputation_weighted: bool = False

    @classmethod
    def parse(cls, rule: str, params: Mapping[str, object] | None = None) -> RuleSpec:
        """`manifest_invalid` for an unknown rule, parameter or value."""
        params = dict(params or {})
        rule_cls = REGISTRY.get(rule)
        if rule_cls is None:
            raise invalid(f"unknown rule {rule!r}; one of {', '.join(RULES)}")
        unknown = set(params) - rule_cls.params - set(COMMON)
        if unknown:
            raise invalid(f"{rule} takes no parameter {', '.join(sorted(unknown))}")
        impl = rule_cls.parse(params)
        bound = None if params.get("norm_bound") is None else float_param(params, "norm_bound", 1)
        if bound is not None and bound < 1.0:
            raise invalid("norm_bound is a multiple of the median norm and must be >= 1")
        action = params.get("norm_action", "clip")
        if action != "clip" and action != "drop":
            raise invalid("norm_action must be 'clip' or 'drop'")
        weighted = params.get("reputation_weighted", False)
        if not isinstance(weighted, bool):
            raise invalid("reputation_weighted must be true or false")
        return cls(impl, bound, action, weighted)

    @property
    def rule(self) -> str:
        """The rule's registered name."""
        return self.impl.name

    @property
    def robust(self) -> bool:
        """Whether the round goes through the robust engine (any rule but plain FedAvg)."""
        return self.impl.robust or self.norm_bound is not None

    def tolerated(self, n: int) -> int:
        """How many Byzantine participants the rule withstands among n (by count)."""
        return self.impl.tolerated(n)

    def minimum_n(self) -> int:
        """The fewest updates the rule accepts; the manifest's min_participants must reach it."""
        need = self.impl.minimum_n()
        if self.norm_bound is not None:
            need = max(need, 3)
        return need

    def check(self, n: int, weights: Sequence[int] | None = None) -> None:
        """`fedlearn_tolerance_exceeded` when n updates (with these weights) are beyond what the
        rule can defend; the message names the condition."""
        if n > MAX_UPDATES:
            raise beyond(f"at most {MAX_UPDATES} updates can be aggregated")
        self.impl.check(n, weights, self.minimum_n())
