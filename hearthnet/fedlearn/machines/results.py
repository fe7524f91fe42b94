"""The participant machine's pure checks of a round's result and of a mask roster.

A valid signature only says who made a result; what else a node can check without I/O is here:
who may send it, that it is for this round's manifest, that its listing is consistent and holds
this node's own submission as signed (`verify.check_listing`), and whether this node holds every
listed submission and so can recompute it (docs/decisions.md, "Hostile peers").
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.machines.effects import Aggregate
from hearthnet.fedlearn.masks import MaskKeyAnnouncement
from hearthnet.fedlearn.protocol import RoundResult, SignedDoc
from hearthnet.fedlearn.state import Membership
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.fedlearn.verify import check_listing, held_for_recompute

Influence = Callable[[Mapping[str, SignedDoc]], Mapping[str, float]]


class Suspect(HearthnetError):
    """A refusal the driver also records as a security event (`peer` sent a bad `what`)."""

    def __init__(self, peer: str, what: str, err: HearthnetError):
        super().__init__(err.code, err.message, err.detail)
        self.peer = peer
        self.what = what


def open_result(
    member: Membership, me: str, doc: SignedDoc, sender: str, takeover_turn: bool
) -> tuple[RoundResult, bool]:
    """A signed result from `sender`: its coordinator's, or a takeover in its turn
    (`takeover_turn`, judged by the taker's code); and whether it is new here."""
    claimed = doc.claimed(RoundResult)
    if claimed.round_id != member.round_id:
        raise HearthnetError(ErrorCode.BAD_REQUEST, "result is for another round")
    coordinator = member.signed.manifest.coordinator
    if sender not in (claimed.aggregator, me) or not (
        claimed.aggregator == coordinator or takeover_turn
    ):
        raise HearthnetError(ErrorCode.FORBIDDEN, "not a result this node accepts")
    try:
        result = doc.open(RoundResult, claimed.aggregator)
    except HearthnetError as err:
        raise Suspect(sender, "round result", err) from None
    if result.manifest_sha != member.signed.manifest_sha:
        raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "result is for another manifest")
    done = member.result
    if done is not None and (
        done.claimed(RoundResult).aggregated_delta_sha == result.aggregated_delta_sha
    ):
        return result, False
    return result, True


def recompute_plan(
    member: Membership,
    me: str,
    result: RoundResult,
    held: Mapping[str, ParticipantSubmission],
    receipts: Mapping[str, SignedDoc],
    masks: Mapping[str, MaskKeyAnnouncement],
    influence: Influence,
) -> Aggregate | None:
    """What this node can check of a result beyond its signature: its own entry always (raises
    `signature_invalid`); when it holds every listed submission, the `Aggregate` that recomputes
    it. None: it aggregated the result itself, or lacks a listed submission."""
    check_listing(result, me, member.submission, member.participants)
    if result.aggregator == me:
        return None
    if member.signed.manifest.secure:
        return None  # masked inputs: only the unmasking coordinator holds what removes the masks
    use, missing = held_for_recompute(result, held)
    if missing:
        return None
    return Aggregate(
        member.signed,
        use,
        {s.delta_sha: s.delta_sha for s in use.values()},
        None,
        influence({p: receipts[p] for p in use}),
    )


def check_mask_holders(
    me: str, trust_roster: Collection[str], enrolled: Collection[str], holders: set[str]
) -> None:
    """Mask only with keys of this node's community who enrolled in the round: a coordinator
    that slipped in keys of identities it controls (Sybils) could otherwise unmask this node's
    update from the pairwise masks it then knows."""
    outsiders = sorted(holders - set(trust_roster) - {me})
    unenrolled = sorted(holders - set(enrolled) - {me})
    if outsiders or unenrolled:
        who = (outsiders or unenrolled)[0]
        why = "outside this node's [trust] roster" if outsiders else "that never joined"
        raise HearthnetError(
            ErrorCode.SIGNATURE_INVALID,
            f"the mask roster holds a key of {who[:16]}…, {why}: this node does not mask "
            "with it and leaves the round",
            {"outsiders": outsiders, "unenrolled": unenrolled},
        )
