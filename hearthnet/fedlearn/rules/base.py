"""What every robust rule is: a named, validated set of parameters, the bound it defends, and
its numeric run (docs/architecture.md, "Adding a robust rule").

A rule class is a frozen dataclass whose fields are its own parameters. Everything here is light
— parsing and bounds need no torch — and `run` imports the kernels of `aggregation/` when it is
called, so a manifest can be validated without loading numba (docs/decisions.md, issue 14).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Self

from hearthnet.errors import ErrorCode, HearthnetError

if TYPE_CHECKING:
    import torch

    from hearthnet.fedlearn.aggregation.robust_ops import Updates


def invalid(message: str) -> HearthnetError:
    """A bad rule or parameter in a manifest."""
    return HearthnetError(ErrorCode.MANIFEST_INVALID, f"aggregation: {message}")


def beyond(message: str) -> HearthnetError:
    """Inputs the rule cannot defend (too few updates, too much weight in few hands)."""
    return HearthnetError(ErrorCode.FEDLEARN_TOLERANCE_EXCEEDED, message)


def int_param(params: Mapping[str, object], name: str, default: int | None) -> int | None:
    """A non-negative integer parameter, or `default` when absent."""
    value = params.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(f"{name} must be a non-negative integer")
    return value


def required_int(params: Mapping[str, object], name: str, default: int) -> int:
    """A non-negative integer parameter that must not be null."""
    value = int_param(params, name, default)
    if value is None:
        raise invalid(f"{name} must be a non-negative integer")
    return value


def float_param(params: Mapping[str, object], name: str, default: float) -> float:
    """A finite number parameter, or `default` when absent."""
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(f"{name} must be a finite number")
    return float(value)


@dataclass(frozen=True)
class RuleRun:
    """A rule's output: one float32 tensor per key, each member's share of the output (summing
    to 1) and why, for the audit record."""

    tensors: list[torch.Tensor]
    share: list[float]
    reasons: list[str]


@dataclass(frozen=True)
class Rule(ABC):
    """Base of every rule: subclass it, set `name` and `params`, and register the class in
    `rules/registry.py`. Defaults describe a rule that tolerates nothing (plain FedAvg)."""

    name: ClassVar[str]
    params: ClassVar[frozenset[str]] = frozenset()  # the rule's own parameter names
    robust: ClassVar[bool] = True  # False only for the plain weighted mean

    @classmethod
    def parse(cls, params: Mapping[str, object]) -> Self:
        """The rule from its (already name-checked) parameters; `manifest_invalid` on a bad one."""
        return cls()

    def tolerated(self, n: int) -> int:
        """How many Byzantine participants the rule withstands among n (by count)."""
        return 0

    def minimum_n(self) -> int:
        """The fewest updates the rule accepts."""
        return 1

    def check(self, n: int, weights: Sequence[int] | None, minimum: int) -> None:
        """`fedlearn_tolerance_exceeded` when n updates (with these weights) are beyond the
        rule; `minimum` is the spec's minimum_n (the norm bound may raise the rule's own)."""
        if n < minimum:
            raise beyond(
                f"{self.name} tolerating f={self.tolerated(max(n, 1))} needs n >= "
                f"{minimum}; got {n}"
            )

    @abstractmethod
    def run(self, view: Updates, weights: Sequence[int]) -> RuleRun:
        """Aggregate `view` (finite, participants in canonical order) with positive weights."""
