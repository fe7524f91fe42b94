"""Adaptive clipping: the clip norm follows a privately estimated quantile of update norms
(Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"; README.md,
"Federated learning: the data plane"; docs/decisions.md, "Privacy budget (issue 15)").

Why. A fixed clip norm must be guessed before anyone trains. Guessed too low it shrinks every
delta to nothing (the old default 1.0 against 30-step SmolLM2 deltas of norm ≈ 24); too high and
DP noise, which scales with the clip, drowns the signal. With `clip_policy = "adaptive"` the
coordinator moves the clip of a topic's next round toward the γ-quantile of the norms seen:

- each participant reports b = 1[‖Δ‖ ≤ C] (its delta's norm before clipping) with its own
  Gaussian noise N(0, σ_b²) when the round has DP (`noised_bit`);
- the coordinator averages the reported bits of the round: b̄ (`mean_bit`);
- the next round of the topic uses C' = C·exp(−η(b̄ − γ)) (the geometric update, `next_clip`).
  DP noise is scaled with the clip (`carry_over`) so the noise multiplier, and with it ε per
  round, stays the same.

Accounting (Theorem 1 of the paper, as TensorFlow Federated's `adaptive_clip_noise_params` also
computes it). A participant releases the noised delta (sensitivity C, noise multiplier
z_Δ = dp_noise_scale / C) and the noised bit; centred as b − ½ its sensitivity is ½, so with noise
σ_b it is a Gaussian mechanism of multiplier 2σ_b. Both together are one Gaussian mechanism of
multiplier z = (z_Δ⁻² + (2σ_b)⁻²)^(−½) — what `effective_multiplier` returns and the budget
accounts (budget.py). `delta_multiplier` inverts it for a target z.

Where the bit travels. In a plain round it is a signed field of the participant's submission
(`ParticipantSubmission.clip_bit`), and the round's result lists it with each included
submission, so anyone holding the result recomputes b̄ and the next clip (`next_round_terms`);
the coordinator's next draft of the topic takes them (`RoundManifestDraft.with_carried_clip`).
A secure round keeps a fixed clip (its bit would have to travel inside the masked vector so
the coordinator sees only the sum; not built), and an adaptive secure manifest is refused.

Pure: no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

ClipPolicy = Literal["fixed", "adaptive"]


@dataclass(frozen=True)
class AdaptiveClip:
    """An adaptive clipping policy: target unclipped quantile γ, step η, bit noise σ_b."""

    quantile: float
    learning_rate: float
    count_noise: float

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile < 1.0:
            raise ValueError("clip quantile γ must be in (0, 1)")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError("clip learning rate η must be finite and > 0")
        if not (self.count_noise >= 0 and math.isfinite(self.count_noise)):
            raise ValueError("clip count noise σ_b must be finite and >= 0")


def unclipped_bit(norm: float, clip: float) -> float:
    """1.0 when a delta of L2 norm `norm` passes clip `clip` unchanged, else 0.0."""
    if not clip > 0:
        raise ValueError("clip must be > 0")
    return 1.0 if norm <= clip else 0.0


def noised_bit(norm: float, clip: float, count_noise: float, standard_normal: float) -> float:
    """The bit a participant reports: 1[norm ≤ clip] + σ_b·g for one standard normal draw g
    (from the participant's secret noise source)."""
    return unclipped_bit(norm, clip) + count_noise * standard_normal


def mean_bit(bits: Iterable[float]) -> float:
    """b̄: the mean of the reported (noised) bits; noise can take it outside [0, 1], which the
    update tolerates."""
    values = [float(b) for b in bits]
    if not values:
        raise ValueError("no bits to average")
    if not all(math.isfinite(b) for b in values):
        raise ValueError("a reported clip bit is not finite")
    return math.fsum(values) / len(values)


def next_clip(clip: float, b_bar: float, policy: AdaptiveClip) -> float:
    """C' = C·exp(−η(b̄ − γ)): more updates unclipped than γ → the clip shrinks, fewer → it
    grows, by at most a factor exp(η·max(γ, 1 − γ)) per round when b̄ ∈ [0, 1]."""
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError("clip must be finite and > 0")
    if not math.isfinite(b_bar):
        raise ValueError("b̄ must be finite")
    return clip * math.exp(-policy.learning_rate * (b_bar - policy.quantile))


def carry_over(
    clip: float, noise_scale: float, b_bar: float, policy: AdaptiveClip
) -> tuple[float, float]:
    """The next round's (clip_norm, dp_noise_scale): the clip moved by `next_clip`, the noise
    scaled by the same factor so z_Δ = noise / clip, and so ε per round, is unchanged."""
    new_clip = next_clip(clip, b_bar, policy)
    return new_clip, noise_scale * (new_clip / clip)


def effective_multiplier(delta_multiplier: float, count_noise: float) -> float:
    """z of the pair (noised delta, noised bit): (z_Δ⁻² + (2σ_b)⁻²)^(−½). A bit without noise
    (σ_b = 0) is released exactly: z = 0, no privacy; so is a delta without noise."""
    if delta_multiplier < 0 or count_noise < 0:
        raise ValueError("noise multipliers are >= 0")
    if delta_multiplier == 0 or count_noise == 0:
        return 0.0
    return float((delta_multiplier**-2 + (2 * count_noise) ** -2) ** -0.5)


def delta_multiplier(target: float, count_noise: float) -> float:
    """z_Δ the delta needs so that delta and bit together have multiplier `target`; needs
    2σ_b > target (else the bit alone spends more than the target allows)."""
    if not target > 0:
        raise ValueError("target multiplier must be > 0")
    if not 2 * count_noise > target:
        raise ValueError(
            f"clip count noise σ_b = {count_noise:g} is too small for a total noise multiplier "
            f"of {target:g}: it needs σ_b > {target / 2:g}"
        )
    return float((target**-2 - (2 * count_noise) ** -2) ** -0.5)


class ClipTerms(Protocol):
    """The manifest fields the clip policy reads (a `RoundManifest` has them)."""

    @property
    def clip_policy(self) -> str: ...
    @property
    def clip_norm(self) -> float: ...
    @property
    def dp_noise_scale(self) -> float: ...
    @property
    def clip_quantile(self) -> float: ...
    @property
    def clip_learning_rate(self) -> float: ...
    @property
    def clip_count_noise(self) -> float: ...


def policy_of(m: ClipTerms) -> AdaptiveClip | None:
    """The manifest's adaptive policy; None when its clip is fixed (or off)."""
    if m.clip_policy != "adaptive" or m.clip_norm <= 0:
        return None
    return AdaptiveClip(m.clip_quantile, m.clip_learning_rate, m.clip_count_noise)


def next_round_terms(m: ClipTerms, bits: Iterable[float | None]) -> dict[str, float] | None:
    """The topic's next clip_norm and dp_noise_scale after a round of `m` whose included
    submissions reported `bits`; None when the clip is fixed or no bit was reported (the next
    round keeps its own)."""
    policy = policy_of(m)
    reported = [b for b in bits if b is not None]
    if policy is None or not reported:
        return None
    clip, noise = carry_over(m.clip_norm, m.dp_noise_scale, mean_bit(reported), policy)
    return {"clip_norm": clip, "dp_noise_scale": noise}
