"""Round state as a fold over event-log events (spec M28 §5.1, DESIGN.md §2).

Pure: no I/O. The coordinator's view of a round (`RoundRecord`) and a participant's view of its
own membership (`Membership`) are rebuilt by replaying the node's log, so a restarted node knows
every round it had. Each event type is allowed only in certain phases; anything else is an
`InvalidTransition` and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hearthnet.canonical import parse_canonical
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event
from hearthnet.fedlearn.manifest import RoundManifest, SignedManifest
from hearthnet.fedlearn.masks import MaskKeyAnnouncement
from hearthnet.fedlearn.protocol import SignedDoc
from hearthnet.fedlearn.submission import ParticipantSubmission

ROUND_PREFIX = "fedlearn.round."
MEMBER_PREFIX = "fedlearn.participant."
CONSENT_EVENT = "fedlearn.consent.granted"


class Phase(StrEnum):
    ANNOUNCED = "announced"
    AGGREGATING = "aggregating"
    COMPLETED = "completed"
    ABORTED = "aborted"


class Stage(StrEnum):
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
    "submitted": frozenset({Phase.ANNOUNCED}),
    "rejected": frozenset(Phase),
    "aggregating": frozenset({Phase.ANNOUNCED}),
    "aggregated": frozenset({Phase.AGGREGATING}),
    "completed": frozenset({Phase.AGGREGATING}),
    "aborted": frozenset({Phase.ANNOUNCED, Phase.AGGREGATING}),
}

# participant event (suffix after MEMBER_PREFIX, or the consent event) -> stages it may follow
_MEMBER_ALLOWED: dict[str, frozenset[Stage]] = {
    "consent": frozenset({Stage.OFFERED}),
    "joined": frozenset({Stage.CONSENTED}),
    "trained": frozenset({Stage.JOINED}),
    "submitted": frozenset({Stage.TRAINED}),
    "completed": frozenset({Stage.JOINED, Stage.TRAINED, Stage.SUBMITTED}),
    "aborted": frozenset(
        {Stage.OFFERED, Stage.CONSENTED, Stage.JOINED, Stage.TRAINED, Stage.SUBMITTED}
    ),
}


class InvalidTransition(HearthnetError):
    def __init__(self, message: str):
        super().__init__(ErrorCode.BAD_REQUEST, message)


@dataclass
class Submitted:
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
    submissions: dict[str, Submitted] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    adapter_sha: str | None = None
    result: SignedDoc | None = None
    abort: dict[str, str] | None = None

    @property
    def round_id(self) -> str:
        return self.signed.manifest.round_id

    def check(self, suffix: str) -> None:
        allowed = _ROUND_ALLOWED.get(suffix)
        if allowed is None or self.phase not in allowed:
            raise InvalidTransition(
                f"round {self.round_id}: {suffix} not allowed when {self.phase}"
            )

    def apply(self, suffix: str, payload: dict[str, Any]) -> None:
        self.check(suffix)
        if suffix == "joined":
            self.joined[payload["participant"]] = SignedDoc.model_validate(payload["receipt"])
        elif suffix == "mask_key":
            ann = MaskKeyAnnouncement.model_validate(payload["announcement"])
            self.masks[ann.participant] = ann
        elif suffix == "roster":
            self.roster = list(payload["participants"])
        elif suffix == "submitted":
            sub = ParticipantSubmission.model_validate(payload["submission"])
            self.submissions[sub.participant] = Submitted(sub, payload["blob_sha"])
        elif suffix == "rejected":
            self.rejected.append(
                {k: str(payload[k]) for k in ("participant", "code", "reason") if k in payload}
            )
        elif suffix == "aggregating":
            self.phase = Phase.AGGREGATING
        elif suffix == "aggregated":
            self.adapter_sha = payload["adapter_sha"]
        elif suffix == "completed":
            self.result = SignedDoc.model_validate(payload["result"])
            self.phase = Phase.COMPLETED
        elif suffix == "aborted":
            self.abort = {"code": payload["code"], "reason": payload["reason"]}
            self.phase = Phase.ABORTED


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
    submission: ParticipantSubmission | None = None
    submitted_sha: str | None = None
    result: SignedDoc | None = None
    abort: dict[str, str] | None = None
    # learned from the coordinator's events (not persisted: re-learned on resubscription)
    participants: set[str] = field(default_factory=set)
    roster: dict[str, MaskKeyAnnouncement] | None = None
    coordinator_phase: str = Phase.ANNOUNCED
    seen_seq: int = 0
    # what this node's takeover was handed (memory only): a later result that lists exactly
    # these signed submissions is recomputed and must give the same adapter SHA
    handed: dict[str, Submitted] = field(default_factory=dict)
    handed_receipts: dict[str, SignedDoc] = field(default_factory=dict)
    handed_masks: dict[str, MaskKeyAnnouncement] = field(default_factory=dict)

    @property
    def round_id(self) -> str:
        return self.signed.manifest.round_id

    def check(self, suffix: str) -> None:
        allowed = _MEMBER_ALLOWED.get(suffix)
        if allowed is None or self.stage not in allowed:
            raise InvalidTransition(
                f"round {self.round_id}: {suffix} not allowed when {self.stage}"
            )

    def apply(self, suffix: str, payload: dict[str, Any]) -> None:
        self.check(suffix)
        if suffix == "consent":
            self.stage = Stage.CONSENTED
        elif suffix == "joined":
            self.receipt = SignedDoc.model_validate(payload["receipt"])
            self.stage = Stage.JOINED
        elif suffix == "trained":
            self.trained_sha = payload["blob_sha"]
            self.num_samples = int(payload["num_samples"])
            self.train_loss = float(payload["train_loss"])
            self.steps = int(payload["steps"]) if "steps" in payload else None
            self.stage = Stage.TRAINED
        elif suffix == "submitted":
            self.submission = ParticipantSubmission.model_validate(payload["submission"])
            self.submitted_sha = payload["blob_sha"]
            self.stage = Stage.SUBMITTED
        elif suffix == "completed":
            self.result = SignedDoc.model_validate(payload["result"])
            self.stage = Stage.COMPLETED
        elif suffix == "aborted":
            self.abort = {"code": payload["code"], "reason": payload["reason"]}
            self.stage = Stage.ABORTED


def manifest_of(payload: dict[str, Any]) -> SignedManifest:
    """The manifest stored in an announced/offered event (already verified when recorded)."""
    wire = payload["manifest"]
    body = wire["body"].encode("utf-8")
    return SignedManifest(
        RoundManifest.model_validate(parse_canonical(body)), body, bytes.fromhex(wire["signature"])
    )


def fold_rounds(events: list[Event]) -> dict[str, RoundRecord]:
    """Every round this node coordinates, rebuilt from its log."""
    rounds: dict[str, RoundRecord] = {}
    for event in events:
        if not event.type.startswith(ROUND_PREFIX):
            continue
        suffix = event.type.removeprefix(ROUND_PREFIX)
        payload = event.payload
        if suffix == "announced":
            rounds[payload["round_id"]] = RoundRecord(manifest_of(payload))
        elif payload.get("round_id") in rounds:
            rounds[payload["round_id"]].apply(suffix, payload)
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
            members[payload["round_id"]].apply(suffix, payload)
    return members
