"""Round state as a fold over event-log events (docs/architecture.md, "Federated rounds").

Pure: no I/O. The coordinator's view of a round (`RoundRecord`) and a participant's view of its
own membership (`Membership`) are rebuilt by replaying the node's log, so a restarted node knows
every round it had. Each event type is allowed only in certain phases; anything else is an
`InvalidTransition` and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event
from hearthnet.fedlearn import events as ev
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.masks import MaskKeyAnnouncement
from hearthnet.fedlearn.protocol import SignedDoc
from hearthnet.fedlearn.secagg import UnmaskRequest
from hearthnet.fedlearn.shares import ShareBundle
from hearthnet.fedlearn.submission import ParticipantSubmission

ROUND_PREFIX = ev.ROUND_PREFIX
MEMBER_PREFIX = ev.MEMBER_PREFIX
CONSENT_EVENT = ev.CONSENT_EVENT


class Phase(StrEnum):
    """Where a coordinator's round is; ANNOUNCED, then AGGREGATING, then COMPLETED or ABORTED."""

    ANNOUNCED = "announced"
    UNMASKING = "unmasking"  # secure rounds: submissions closed, reveals awaited
    AGGREGATING = "aggregating"
    COMPLETED = "completed"
    ABORTED = "aborted"


class Stage(StrEnum):
    """Where this node is as a participant of a round, from the offer to a result or an abort."""

    OFFERED = "offered"
    CONSENTED = "consented"
    JOINED = "joined"
    TRAINED = "trained"
    SUBMITTED = "submitted"
    COMPLETED = "completed"
    ABORTED = "aborted"


TERMINAL_PHASES = frozenset({Phase.COMPLETED, Phase.ABORTED})
TERMINAL_STAGES = frozenset({Stage.COMPLETED, Stage.ABORTED})

# coordinator event (suffix after ROUND_PREFIX) -> phases in which it may happen
_ROUND_ALLOWED: dict[str, frozenset[Phase]] = {
    "joined": frozenset({Phase.ANNOUNCED}),
    "mask_key": frozenset({Phase.ANNOUNCED}),
    "roster": frozenset({Phase.ANNOUNCED}),
    "shares": frozenset({Phase.ANNOUNCED}),
    "shares_closed": frozenset({Phase.ANNOUNCED}),
    "unmask": frozenset({Phase.ANNOUNCED, Phase.UNMASKING}),
    "confirmed": frozenset({Phase.UNMASKING}),
    "submitted": frozenset({Phase.ANNOUNCED}),
    "rejected": frozenset(Phase),
    "aggregating": frozenset({Phase.ANNOUNCED, Phase.UNMASKING}),
    "aggregated": frozenset({Phase.AGGREGATING}),
    "completed": frozenset({Phase.AGGREGATING}),
    "aborted": frozenset({Phase.ANNOUNCED, Phase.UNMASKING, Phase.AGGREGATING}),
}

# participant event (suffix after MEMBER_PREFIX, or the consent event) -> stages it may follow
_MEMBER_ALLOWED: dict[str, frozenset[Stage]] = {
    "consent": frozenset({Stage.OFFERED}),
    "joined": frozenset({Stage.CONSENTED}),
    "shared": frozenset({Stage.JOINED}),
    "trained": frozenset({Stage.JOINED}),
    "revealed": frozenset({Stage.JOINED, Stage.TRAINED, Stage.SUBMITTED}),
    "submitted": frozenset({Stage.TRAINED}),
    "completed": frozenset({Stage.JOINED, Stage.TRAINED, Stage.SUBMITTED}),
    "aborted": frozenset(
        {Stage.OFFERED, Stage.CONSENTED, Stage.JOINED, Stage.TRAINED, Stage.SUBMITTED}
    ),
}


class InvalidTransition(HearthnetError):
    """An event the round's phase (or the member's stage) does not allow: a bug or a damaged log,
    so the fold refuses it rather than guessing."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.BAD_REQUEST, message)


@dataclass
class Submitted:
    """A participant's accepted submission and the blob holding its delta."""

    submission: ParticipantSubmission
    blob_sha: str


@dataclass
class RoundRecord:
    """The coordinator's round: everything its log says about it."""

    signed: SignedManifest
    phase: Phase = Phase.ANNOUNCED
    joined: dict[str, SignedDoc] = field(default_factory=dict)
    masks: dict[str, MaskKeyAnnouncement] = field(default_factory=dict)
    roster: list[str] | None = None
    bundles: dict[str, ShareBundle] = field(default_factory=dict)
    shared: list[str] | None = None  # U2: the members whose shares are in
    unmask: UnmaskRequest | None = None
    submissions: dict[str, Submitted] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    adapter_sha: str | None = None
    result: SignedDoc | None = None
    abort: dict[str, str] | None = None

    @property
    def round_id(self) -> str:
        """The round's ID, from its signed manifest."""
        return self.signed.manifest.round_id

    def check(self, suffix: str) -> None:
        """Refuse (`InvalidTransition`) an event the round's phase does not allow."""
        allowed = _ROUND_ALLOWED.get(suffix)
        if allowed is None or self.phase not in allowed:
            raise InvalidTransition(
                f"round {self.round_id}: {suffix} not allowed when {self.phase}"
            )

    def apply(self, suffix: str, payload: ev.Payload | dict[str, Any]) -> None:
        """Fold one coordinator event (a typed payload, or its stored JSON) into the round."""
        self.check(suffix)
        if isinstance(payload, dict):
            payload = ev.ROUND_EVENTS[suffix].model_validate({"round_id": self.round_id, **payload})
        if isinstance(payload, ev.Joined):
            self.joined[payload.participant] = payload.receipt
        elif isinstance(payload, ev.MaskKey):
            self.masks[payload.announcement.participant] = payload.announcement
        elif isinstance(payload, ev.Roster):
            self.roster = list(payload.participants)
        elif isinstance(payload, ev.Shares):
            self.bundles[payload.bundle.sender] = payload.bundle
        elif isinstance(payload, ev.SharesClosed):
            self.shared = list(payload.participants)
        elif isinstance(payload, ev.Unmask):
            self.unmask = payload.request
            self.phase = Phase.UNMASKING
        elif isinstance(payload, ev.Submitted):
            sub = payload.submission
            self.submissions[sub.participant] = Submitted(sub, payload.blob_sha)
        elif isinstance(payload, ev.Rejected):
            self.rejected.append(
                {"participant": payload.participant, "code": payload.code, "reason": payload.reason}
            )
        elif isinstance(payload, ev.Aggregated):
            self.adapter_sha = payload.adapter_sha
        elif isinstance(payload, ev.Completed):
            self.result = payload.result
            self.phase = Phase.COMPLETED
        elif isinstance(payload, ev.Aborted):
            self.abort = {"code": payload.code, "reason": payload.reason}
            self.phase = Phase.ABORTED
        elif suffix == "aggregating":
            self.phase = Phase.AGGREGATING

    def rejections(self) -> dict[str, str]:
        """Each rejected participant's first refusal, as `code: reason`."""
        out: dict[str, str] = {}
        for r in self.rejected:
            out.setdefault(r["participant"], f"{r['code']}: {r['reason']}")
        return out


@dataclass
class Membership:
    """A participant's view of one round it was offered: its own stage and what it learned."""

    signed: SignedManifest
    stage: Stage = Stage.OFFERED
    receipt: SignedDoc | None = None
    trained_sha: str | None = None
    num_samples: int | None = None
    train_loss: float | None = None
    steps: int | None = None  # training steps run (of the manifest's train_steps)
    clip_bit: float | None = None  # adaptive clipping's noised bit, sent with the submission
    submission: ParticipantSubmission | None = None
    submitted_sha: str | None = None
    result: SignedDoc | None = None
    abort: dict[str, str] | None = None
    bundle: ShareBundle | None = None  # secure rounds: this node's sealed shares
    revealed_sha: str | None = None  # the unmask request this node answered
    # learned from the coordinator's events (not persisted: re-learned on resubscription)
    participants: set[str] = field(default_factory=set)
    roster: dict[str, MaskKeyAnnouncement] | None = None
    bundles: dict[str, ShareBundle] = field(default_factory=dict)  # neighbours' shares
    shared: list[str] | None = None  # U2
    unmask: UnmaskRequest | None = None
    unmask_count: int = 0  # unmask requests seen (a coordinator restart repeats it)
    confirmations: dict[str, str] | None = None  # every survivor's signature on the request
    confirm_count: int = 0
    coordinator_phase: str = Phase.ANNOUNCED
    seen_seq: int = 0
    # what this node's takeover was handed (memory only): a later result that lists exactly
    # these signed submissions is recomputed and must give the same adapter SHA
    handed: dict[str, Submitted] = field(default_factory=dict)
    handed_receipts: dict[str, SignedDoc] = field(default_factory=dict)
    handed_masks: dict[str, MaskKeyAnnouncement] = field(default_factory=dict)

    @property
    def round_id(self) -> str:
        """The round's ID, from its signed manifest."""
        return self.signed.manifest.round_id

    def check(self, suffix: str) -> None:
        """Refuse (`InvalidTransition`) an event this member's stage does not allow."""
        allowed = _MEMBER_ALLOWED.get(suffix)
        if allowed is None or self.stage not in allowed:
            raise InvalidTransition(
                f"round {self.round_id}: {suffix} not allowed when {self.stage}"
            )

    def apply(self, suffix: str, payload: ev.Payload) -> None:
        """Fold one of this node's participant events (typed: `events.MEMBER_EVENTS`)."""
        self.check(suffix)
        if suffix == "consent":
            self.stage = Stage.CONSENTED
        elif suffix == "joined" and isinstance(payload, ev.MemberJoined):
            self.receipt = payload.receipt
            self.num_samples = payload.num_samples  # what a secure round's key announces
            self.stage = Stage.JOINED
        elif suffix == "shared" and isinstance(payload, ev.MemberShared):
            self.bundle = payload.bundle
        elif suffix == "revealed" and isinstance(payload, ev.MemberRevealed):
            self.revealed_sha = payload.unmask_sha
        elif suffix == "trained" and isinstance(payload, ev.Trained):
            self.trained_sha = payload.blob_sha
            self.num_samples = payload.num_samples
            self.train_loss = payload.train_loss
            self.steps = payload.steps
            self.clip_bit = payload.clip_bit
            self.stage = Stage.TRAINED
        elif suffix == "submitted" and isinstance(payload, ev.MemberSubmitted):
            self.submission = payload.submission
            self.submitted_sha = payload.blob_sha
            self.stage = Stage.SUBMITTED
        elif suffix == "completed" and isinstance(payload, ev.Completed):
            self.result = payload.result
            self.stage = Stage.COMPLETED
        elif suffix == "aborted" and isinstance(payload, ev.Aborted):
            self.abort = {"code": payload.code, "reason": payload.reason}
            self.stage = Stage.ABORTED
        else:
            raise InvalidTransition(f"round {self.round_id}: {suffix} with a wrong payload")


def manifest_of(payload: dict[str, Any]) -> SignedManifest:
    """The manifest stored in an announced/offered event (already verified when recorded)."""
    wire = payload["manifest"]
    return SignedManifest.parse(wire["body"], wire["signature"])


def signed_manifest(doc: SignedDoc) -> SignedManifest:
    """The manifest an `Announced` event stored (already verified when it was recorded)."""
    return SignedManifest.parse(doc.body, doc.signature)


def fold_rounds(events: list[Event]) -> dict[str, RoundRecord]:
    """Every round this node coordinates, rebuilt from its log."""
    rounds: dict[str, RoundRecord] = {}
    for event in events:
        if not event.type.startswith(ROUND_PREFIX):
            continue
        suffix = event.type.removeprefix(ROUND_PREFIX)
        model = ev.ROUND_EVENTS.get(suffix)
        if model is None:
            continue
        payload = model.model_validate(event.payload)
        if isinstance(payload, ev.Announced):
            rounds[payload.round_id] = RoundRecord(signed_manifest(payload.manifest))
        elif payload.round_id in rounds:
            rounds[payload.round_id].apply(suffix, payload)
    return rounds


def fold_memberships(events: list[Event]) -> dict[str, Membership]:
    """Every round this node was offered or took part in, rebuilt from its log."""
    members: dict[str, Membership] = {}
    for event in events:
        payload = event.payload
        if event.type == CONSENT_EVENT:
            suffix = "consent"
        elif event.type.startswith(MEMBER_PREFIX):
            suffix = event.type.removeprefix(MEMBER_PREFIX)
        else:
            continue
        if suffix == "offered":
            members.setdefault(payload["round_id"], Membership(manifest_of(payload)))
        elif payload.get("round_id") in members:
            member = members[payload["round_id"]]
            member.check(suffix)
            member.apply(suffix, ev.MEMBER_EVENTS[suffix].model_validate(payload))
    return members
