"""Deviation-derived reputation: how closely a participant's updates follow the robust consensus.

Not trust: a signal this node derives from rounds it aggregated itself (as coordinator or
takeover node) — the evidence is the participants' own signed submissions. Per round and
participant, one `fedlearn.reputation.updated` event records the new score; the table is a fold
of those events, so a restart rebuilds it exactly.

Scores live in [0, 1] and start at NEUTRAL. After each recorded round every score first decays
toward NEUTRAL (its distance shrinks by `decay` per round recorded since its last update: old
behaviour fades, a ban is served, not eternal), then moves:
- a rejected submission (`delta_invalid`, bad signature, ...)  −REJECTED_PENALTY
- excluded by the rule, or deviation > DEVIATION_LIMIT          −PENALTY
- kept with deviation ≤ DEVIATION_LIMIT                         +REWARD
- down-weighted (partly trimmed, capped) or clipped, in the limit no change
A clipped update (outside `norm_bound`) is never rewarded, but not penalised for the clip
alone: a bound may be as low as the median norm (1×), where half of the honest updates are
clipped. Its deviation is that of the unclipped update, so an attacker clipped from many times
the median is penalised through the deviation limit.
Deviation is the participant's distance to the aggregate over the median participant's
distance (`robust.Verdict.deviation`), so honest spread sits near 1 at any scale.

A score below the ban threshold refuses joins; a manifest's `min_reputation` refuses joins below
it; with `reputation_weighted`, a participant's weight is scaled by min(score³, INFLUENCE_CAP)
(cubic: a neutral 0.5 counts 0.125, a long-standing 0.93+ is capped at 0.8, so no reputation
lets one node dominate).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

NEUTRAL = 0.5
REWARD = 0.05
PENALTY = 0.15
REJECTED_PENALTY = 0.25
DEVIATION_LIMIT = 3.0
INFLUENCE_CAP = 0.8
EVENT = "fedlearn.reputation.updated"

Signal = Literal["rewarded", "penalised", "rejected", "unchanged"]


def influence(score: float, cap: float = INFLUENCE_CAP) -> float:
    """The bounded weight factor min(score³, cap)."""
    return min(max(score, 0.0) ** 3, cap)


@dataclass(frozen=True)
class Observation:
    """What one round showed about one participant."""

    participant: str
    action: str  # a robust.Verdict action, or "rejected"
    deviation: float
    reason: str


@dataclass(frozen=True)
class Standing:
    """One participant's score as of an epoch (it decays toward neutral from there), and how many
    rounds it took part in."""

    score: float  # as of `epoch`
    epoch: int
    rounds: int
    last_round: str


class ReputationTable:
    """The fold of this node's reputation events."""

    def __init__(self, decay: float, ban_below: float):
        self.decay = decay
        self.ban_below = ban_below
        self.epoch = 0
        self.standings: dict[str, Standing] = {}
        self.rounds: set[str] = set()

    def score(self, participant: str) -> float:
        """The decayed score now (NEUTRAL for a participant never seen)."""
        return self._at(participant, self.epoch)

    def _at(self, participant: str, epoch: int) -> float:
        s = self.standings.get(participant)
        if s is None:
            return NEUTRAL
        return NEUTRAL + (s.score - NEUTRAL) * self.decay ** (epoch - s.epoch)

    def banned(self, participant: str) -> bool:
        """Whether this node now refuses the participant (its decayed score is under the ban
        threshold)."""
        return self.score(participant) < self.ban_below

    def changes(self, round_id: str, observed: Iterable[Observation]) -> list[dict[str, Any]]:
        """The event bodies for one round (pure: `apply` them after they are logged). Empty if
        the round was already recorded."""
        if round_id in self.rounds:
            return []
        epoch = self.epoch + 1
        bodies = []
        for ob in sorted(observed, key=lambda o: o.participant):
            before = self._at(ob.participant, epoch)
            signal, delta = _signal(ob)
            after = min(1.0, max(0.0, before + delta))
            bodies.append(
                {
                    "round_id": round_id,
                    "epoch": epoch,
                    "participant": ob.participant,
                    "score": round(after, 6),
                    "change": round(after - before, 6),
                    "signal": signal,
                    "deviation": ob.deviation,
                    "reason": ob.reason[:256],
                }
            )
        return bodies

    def apply(self, body: Mapping[str, Any]) -> None:
        """Fold one logged `fedlearn.reputation.updated` body into the table."""
        p = str(body["participant"])
        epoch = int(body["epoch"])
        previous = self.standings.get(p)
        self.standings[p] = Standing(
            score=float(body["score"]),
            epoch=epoch,
            rounds=(previous.rounds if previous else 0) + 1,
            last_round=str(body["round_id"]),
        )
        self.epoch = max(self.epoch, epoch)
        self.rounds.add(str(body["round_id"]))

    def rows(self) -> list[dict[str, Any]]:
        """The table for `hearthnet fedlearn reputation`, best first."""
        out = [
            {
                "participant": p,
                "score": round(self.score(p), 4),
                "influence": round(influence(self.score(p)), 4),
                "banned": self.banned(p),
                "rounds": s.rounds,
                "last_round": s.last_round,
            }
            for p, s in self.standings.items()
        ]
        return sorted(out, key=lambda r: (-r["score"], r["participant"]))


def _signal(ob: Observation) -> tuple[Signal, float]:
    if ob.action == "rejected":
        return "rejected", -REJECTED_PENALTY
    if ob.action == "excluded" or ob.deviation > DEVIATION_LIMIT:
        return "penalised", -PENALTY
    if ob.action == "kept":
        return "rewarded", REWARD
    return "unchanged", 0.0


def fold(events: Iterable[Mapping[str, Any]], decay: float, ban_below: float) -> ReputationTable:
    """Rebuild the table from `fedlearn.reputation.updated` event bodies, in log order."""
    table = ReputationTable(decay, ban_below)
    for body in events:
        table.apply(body)
    return table
