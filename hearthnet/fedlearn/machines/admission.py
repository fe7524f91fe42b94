"""What the coordinator admits: a new round, a joining node, a mask key, a submission (pure
checks, in order), and when a secure round's mask roster closes.

Join receipts are the participation tokens: signed by the coordinator, bound to one participant
and one round; a submission without a valid one is refused. Every check raises the
`HearthnetError` the caller sees; the coordinator machine records a refused submission.
"""

from __future__ import annotations

from datetime import datetime

from hearthnet import constants as C
from hearthnet.config import NodeConfig
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.masks import MaskKeyAnnouncement, check_roster
from hearthnet.fedlearn.protocol import JoinReceipt, SignedDoc
from hearthnet.fedlearn.state import Phase, RoundRecord
from hearthnet.fedlearn.submission import ParticipantSubmission


def check_announce(rounds: int, config: NodeConfig, secure: bool) -> None:
    """May this node announce another round (it holds `rounds`), secure or not."""
    if rounds >= C.FEDLEARN_MAX_ROUNDS:
        raise HearthnetError(ErrorCode.OVERLOADED, "too many rounds on this node")
    if config.fedlearn.require_secure_aggregation and not secure:
        raise HearthnetError(
            ErrorCode.MANIFEST_INVALID,
            "this node requires secure rounds ([fedlearn] require_secure_aggregation): "
            "announce with --secure",
        )


def check_own_base_model(signed: SignedManifest, base_model_sha: str) -> None:
    """A coordinator announces only rounds over its own base model. (Not
    `requirements.check_base_model`: that one speaks to a joining node.)"""
    if signed.manifest.base_model_sha != base_model_sha:
        raise HearthnetError(
            ErrorCode.BASE_MODEL_MISMATCH,
            "a round must use this node's own base model",
            {"local": base_model_sha, "round": signed.manifest.base_model_sha},
        )


def admit(
    record: RoundRecord,
    config: NodeConfig,
    node_id: str,
    caller: str,
    manifest_sha: str,
    score: float,
    banned: bool,
) -> None:
    """May `caller` (reputation `score`, `banned` by this node's threshold) join at all: a
    member of the `[trust] roster` if there is one, for this manifest, reputable enough. A node
    does not refuse itself, except as a member of its own secure round."""
    m = record.signed.manifest
    roster = config.trust.roster
    if roster and caller not in roster and caller != node_id:
        raise HearthnetError(ErrorCode.FORBIDDEN, "not a member of this community")
    if manifest_sha != record.signed.manifest_sha:
        raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "manifest rejected")
    if caller == node_id and m.secure:
        raise HearthnetError(
            ErrorCode.FORBIDDEN,
            "the coordinator of a secure round cannot also be a member: it would hold a "
            "neighbour's share of every member's secrets; train from another node",
        )
    if caller == node_id:
        return
    if banned:
        raise HearthnetError(
            ErrorCode.REPUTATION_TOO_LOW,
            f"reputation {score:.3f} is below this node's ban threshold",
        )
    if m.min_reputation is not None and score < m.min_reputation:
        raise HearthnetError(
            ErrorCode.REPUTATION_TOO_LOW,
            f"reputation {score:.3f} is below the round's min_reputation {m.min_reputation}",
        )


def check_open(record: RoundRecord, now: datetime) -> None:
    """Is there still a place for a new member: before the deadline, before a secure round's
    roster closed, below `max_participants`."""
    m = record.signed.manifest
    if record.phase is not Phase.ANNOUNCED or now >= m.deadline_at:
        raise HearthnetError(ErrorCode.ROUND_CLOSED, "the round is closed")
    if m.secure and record.roster is not None:
        raise HearthnetError(ErrorCode.ROUND_CLOSED, "the round's mask roster is closed")
    if len(record.joined) >= m.max_participants:
        raise HearthnetError(ErrorCode.ROUND_FULL, "the round is full")


def check_receipt(record: RoundRecord, node_id: str, participant: str, receipt: SignedDoc) -> None:
    """`forbidden` unless `receipt` is `node_id`'s receipt for `participant` in the round."""
    issued = receipt.open(JoinReceipt, node_id)
    if (
        issued.round_id != record.round_id
        or issued.participant != participant
        or issued.manifest_sha != record.signed.manifest_sha
        or participant not in record.joined
    ):
        raise HearthnetError(ErrorCode.FORBIDDEN, "no valid join receipt for this round")


def check_submission(
    record: RoundRecord,
    node_id: str,
    caller: str,
    sub: ParticipantSubmission,
    receipt: SignedDoc,
    data: bytes,
    now: datetime,
    limit: int,
) -> None:
    """Owner, signature, receipt, deadline, duplicate, steps, size and roster, in that order;
    the payload itself (`aggregation.run.check_payload`, blocking) is the driver's to run next."""
    m = record.signed.manifest
    if sub.participant != caller:
        raise HearthnetError(ErrorCode.FORBIDDEN, "a submission is the caller's own")
    sub.verify(data)
    check_receipt(record, node_id, sub.participant, receipt)
    if record.phase is not Phase.ANNOUNCED or now > m.deadline_at:
        raise HearthnetError(ErrorCode.ROUND_CLOSED, "submission after the deadline")
    if sub.participant in record.submissions:
        raise HearthnetError(ErrorCode.DELTA_INVALID, "participant already submitted")
    if sub.steps is not None and sub.steps > m.train_steps:
        raise HearthnetError(
            ErrorCode.DELTA_INVALID,
            f"{sub.steps} training steps claimed; the manifest asks for {m.train_steps}",
        )
    if len(data) > limit:
        raise HearthnetError(ErrorCode.DELTA_INVALID, f"submission exceeds {limit} bytes")
    if m.secure:
        if record.shared is None or sub.participant not in record.shared:
            raise HearthnetError(
                ErrorCode.DELTA_INVALID, "not in the round's share set (mask roster, then shares)"
            )
        if sub.num_samples != record.masks[sub.participant].num_samples:
            raise HearthnetError(ErrorCode.DELTA_INVALID, "num_samples differs from the mask key")


def check_mask_key(record: RoundRecord, caller: str, ann: MaskKeyAnnouncement) -> bool:
    """A joined member's own, signed mask key for this secure round while the roster is open;
    False for the same key announced again."""
    if not record.signed.manifest.secure:
        raise HearthnetError(ErrorCode.BAD_REQUEST, "the round is not secure")
    if ann.participant != caller or caller not in record.joined:
        raise HearthnetError(ErrorCode.FORBIDDEN, "no valid join receipt for this round")
    ann.verify()
    if ann.manifest_sha != record.signed.manifest_sha:
        raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "mask key is for another round")
    if caller in record.masks:
        if record.masks[caller] != ann:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "a mask key was already announced")
        return False
    if record.roster is not None or record.phase is not Phase.ANNOUNCED:
        raise HearthnetError(ErrorCode.ROUND_CLOSED, "the mask roster is closed")
    return True


def roster_to_close(record: RoundRecord, timer: bool) -> list[str] | None:
    """The roster to close now, if any: once every place is taken, or at the roster timer with
    at least `min_participants` keys (checked with `masks.check_roster`)."""
    m = record.signed.manifest
    n = len(record.masks)
    if record.roster is not None or n < m.min_participants:
        return None
    if n < m.max_participants and not timer:
        return None
    participants = sorted(record.masks)
    check_roster({p: record.masks[p] for p in participants}, m, record.signed.manifest_sha)
    return participants
