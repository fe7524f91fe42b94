"""A participant's privacy budget: ε per round, the ledger per topic, and the join check
(README.md, "Federated learning: privacy budget"; docs/decisions.md, "Privacy budget").

One round is the Gaussian mechanism on the participant's whole delta (clipped to `clip_norm`,
noised once with `dp_noise_scale`), so its noise multiplier is dp_noise_scale / clip_norm with
one step at sampling rate 1 (the participant-level guarantee of `privacy.round_epsilon`). Rounds
on one topic compose: the ledger hands every joined round's Gaussian event to one
`dp_accounting` RDP accountant and reads ε at the node's δ. A round without noise is ε = ∞, and
so is any topic that ever joined one.

Pure and light: `dp_accounting` (numpy, scipy) is imported when a number is computed, so the
machines that call this stay importable without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.manifest import RoundManifest as Manifest


def noise_multiplier(m: Manifest) -> float | None:
    """σ of the round's Gaussian mechanism; None when the round adds no noise (no DP). With
    adaptive clipping the participant also releases its noised clipped/unclipped bit, and the
    pair is one Gaussian mechanism of multiplier (z_Δ⁻² + (2σ_b)⁻²)^(−½) (clipping.py)."""
    if m.dp_noise_scale <= 0 or m.clip_norm <= 0:
        return None
    z_delta = m.dp_noise_scale / m.clip_norm
    if m.clip_policy != "adaptive":
        return z_delta
    from hearthnet.fedlearn.clipping import effective_multiplier

    z = effective_multiplier(z_delta, m.clip_count_noise)
    return z if z > 0 else None


def composed_epsilon(sigmas: Iterable[float | None], delta: float) -> float:
    """ε at `delta` of these rounds composed (RDP); 0 for none, ∞ if any had no noise."""
    import dp_accounting
    from dp_accounting import rdp

    if not 0 < delta < 1:
        raise ValueError("0 < delta < 1")
    accountant = rdp.RdpAccountant()
    count = 0
    for sigma in sigmas:
        if sigma is None:
            return math.inf
        accountant.compose(dp_accounting.GaussianDpEvent(sigma))
        count += 1
    return 0.0 if count == 0 else float(accountant.get_epsilon(delta))


def round_epsilon(m: Manifest, delta: float) -> float:
    """ε of one round of this manifest at `delta` (∞ without DP)."""
    return composed_epsilon([noise_multiplier(m)], delta)


def wire_epsilon(eps: float) -> float | None:
    """ε as JSON carries it: None stands for ∞ (JSON has no infinity)."""
    return None if math.isinf(eps) else eps


def show(eps: float | None) -> str:
    """ε for people: ∞ for a round (or topic) without DP."""
    return "∞ (no DP)" if eps is None or math.isinf(eps) else f"{eps:.3f}"


@dataclass(frozen=True)
class TopicLedger:
    """The rounds this node joined on one topic and their noise multipliers (None: no DP)."""

    topic: str
    rounds: tuple[str, ...]
    sigmas: tuple[float | None, ...]

    def epsilon(self, delta: float) -> float:
        """The topic's composed ε at `delta`."""
        return composed_epsilon(self.sigmas, delta)


Ledger = Mapping[str, TopicLedger]


def fold_ledger(joined: Iterable[tuple[str, Manifest]]) -> dict[str, TopicLedger]:
    """The ledger from the rounds this node joined (round ID, manifest), in log order."""
    rounds: dict[str, list[str]] = {}
    sigmas: dict[str, list[float | None]] = {}
    for round_id, m in joined:
        rounds.setdefault(m.topic, []).append(round_id)
        sigmas.setdefault(m.topic, []).append(noise_multiplier(m))
    return {t: TopicLedger(t, tuple(rounds[t]), tuple(sigmas[t])) for t in sorted(rounds)}


def after_join(ledger: Ledger, m: Manifest, delta: float) -> float:
    """The topic's composed ε at `delta` if this node also joins the round of `m`."""
    past = ledger.get(m.topic)
    prior: list[float | None] = []
    if past is not None:
        prior = [s for r, s in zip(past.rounds, past.sigmas, strict=True) if r != m.round_id]
    return composed_epsilon([*prior, noise_multiplier(m)], delta)


def check_join(
    ledger: Ledger, m: Manifest, delta: float, budget: float | None, require_dp: bool
) -> float:
    """Refuse a round without DP when `require_dp`, or one that would take its topic's
    composed ε over `budget`; returns the round's own ε at `delta`."""
    eps = round_epsilon(m, delta)
    if require_dp and math.isinf(eps):
        raise HearthnetError(
            ErrorCode.PRIVACY_BUDGET_EXCEEDED,
            f"round {m.round_id} adds no DP noise (ε = ∞) and [fedlearn] require_dp = true",
        )
    if budget is None:
        return eps
    total = after_join(ledger, m, delta)
    if total > budget:
        spent = ledger.get(m.topic)
        before = 0.0 if spent is None else spent.epsilon(delta)
        raise HearthnetError(
            ErrorCode.PRIVACY_BUDGET_EXCEEDED,
            f"joining round {m.round_id} would take topic '{m.topic}' to ε = {show(total)} at "
            f"δ = {delta:g} (spent {show(before)} so far, this round {show(eps)}), over "
            f"[fedlearn] dp_epsilon_budget = {budget:g}",
        )
    return eps


@dataclass(frozen=True)
class PrivacyPolicy:
    """The node's `[fedlearn]` privacy settings, as the participant machine applies them."""

    delta: float = C.FEDLEARN_DP_DELTA_DEFAULT
    budget: float | None = None
    require_dp: bool = False
