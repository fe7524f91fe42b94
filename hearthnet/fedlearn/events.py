"""The round events a node writes to its own log, as typed payloads.

One model per event type, shared by the code that writes an event (the round machines) and the
fold that reads it back (`state.py`), so a field cannot be spelled one way on write and another
on read. Light: pydantic and the signed-document models only, no torch or numba.

Types, with the prefix the log uses (docs/architecture.md lists them with their meaning):

| event type                         | payload model     | written by            |
|------------------------------------|-------------------|-----------------------|
| fedlearn.round.announced           | Announced         | coordinator           |
| fedlearn.round.joined              | Joined            | coordinator           |
| fedlearn.round.mask_key            | MaskKey           | coordinator           |
| fedlearn.round.roster              | Roster            | coordinator           |
| fedlearn.round.shares              | Shares            | coordinator           |
| fedlearn.round.shares_closed       | SharesClosed      | coordinator           |
| fedlearn.round.unmask              | Unmask            | coordinator           |
| fedlearn.round.confirmed           | Confirmed         | coordinator           |
| fedlearn.round.submitted           | Submitted         | coordinator           |
| fedlearn.round.rejected            | Rejected          | coordinator           |
| fedlearn.round.aggregating         | RoundOnly         | coordinator           |
| fedlearn.round.aggregated          | Aggregated        | coordinator           |
| fedlearn.round.completed           | Completed         | coordinator           |
| fedlearn.round.aborted             | Aborted           | coordinator           |
| fedlearn.participant.offered       | Offered           | participant           |
| fedlearn.consent.granted           | ConsentGranted    | participant           |
| fedlearn.participant.joined        | MemberJoined      | participant           |
| fedlearn.participant.shared        | MemberShared      | participant           |
| fedlearn.participant.trained       | Trained           | participant           |
| fedlearn.participant.revealed      | MemberRevealed    | participant           |
| fedlearn.participant.submitted     | MemberSubmitted   | participant           |
| fedlearn.participant.completed     | Completed         | participant           |
| fedlearn.participant.aborted       | Aborted           | participant           |
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from hearthnet.fedlearn.masks import MaskKeyAnnouncement
from hearthnet.fedlearn.protocol import SignedDoc
from hearthnet.fedlearn.secagg import UnmaskRequest
from hearthnet.fedlearn.shares import ShareBundle
from hearthnet.fedlearn.submission import ParticipantSubmission

ROUND_PREFIX = "fedlearn.round."
MEMBER_PREFIX = "fedlearn.participant."
CONSENT_EVENT = "fedlearn.consent.granted"

_SHA = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_REASON = Annotated[str, Field(max_length=256)]


class Payload(BaseModel):
    """Every round event names its round. Unknown fields are kept (`extra="allow"`) so a log
    written by a newer build still folds."""

    model_config = ConfigDict(extra="allow", frozen=True)
    round_id: Annotated[str, Field(min_length=1, max_length=64)]

    def body(self) -> dict[str, Any]:
        """The payload as the log stores it (JSON-ready, no `None` fields)."""
        return self.model_dump(mode="json", exclude_none=True)


class RoundOnly(Payload):
    """A round event with nothing but its round (`fedlearn.round.aggregating`)."""

    pass


class Announced(Payload):
    """The coordinator announced the round; the signed manifest is the round's root."""

    manifest: SignedDoc  # the manifest's exact JCS body and its coordinator signature


class Joined(Payload):
    """The coordinator admitted a participant and signed its receipt."""

    participant: str
    receipt: SignedDoc


class MaskKey(Payload):
    """The coordinator recorded a participant's mask-key announcement (secure rounds)."""

    announcement: MaskKeyAnnouncement


class Roster(Payload):
    """The coordinator fixed a secure round's participants; later joins are refused. `graph`:
    the SecAgg+ structure every member derives from it (its group sizes → degree, threshold),
    recorded for the operator; members derive their own and refuse a roster that differs."""

    participants: list[str]
    graph: list[dict[str, int]] | None = None


class Shares(Payload):
    """The coordinator recorded a roster member's signed, encrypted shares (secure rounds); its
    neighbours read theirs from this event."""

    bundle: ShareBundle


class SharesClosed(Payload):
    """The share phase closed: the members (U2) whose shares are in, the ones who mask."""

    participants: list[str]


class Unmask(Payload):
    """The coordinator asks the share set to reveal: survivors' self-mask shares, dropped
    members' mask-key shares (logged again, unchanged, after a coordinator restart)."""

    request: UnmaskRequest


class Confirmed(Payload):
    """Every survivor signed the unmask request `unmask_sha`; members reveal only once they
    hold these signatures (logged again after a coordinator restart)."""

    unmask_sha: _SHA
    signatures: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]]


class Submitted(Payload):
    """The coordinator accepted a participant's signed submission; the delta is the blob
    `blob_sha`."""

    participant: str
    submission: ParticipantSubmission
    blob_sha: _SHA


class Rejected(Payload):
    """The coordinator refused a participant's submission, with the error code and why."""

    participant: str
    code: str
    reason: _REASON


class Aggregated(Payload):
    """The coordinator computed the adapter `adapter_sha` (stored as a blob)."""

    adapter_sha: _SHA


class Completed(Payload):
    """The round's signed result, logged by the coordinator and by each participant that accepted
    it."""

    result: SignedDoc


class Aborted(Payload):
    """The round ended without a result, with the error code and why."""

    code: str
    reason: _REASON


class Offered(Payload):
    """A participant received a signed manifest; it waits for the operator's consent."""

    manifest: SignedDoc  # the manifest's exact JCS body and its coordinator signature


class ConsentGranted(Payload):
    """The operator consented to this manifest and its consent text; training needs this record."""

    manifest_sha: _SHA
    consent_text_sha: _SHA


class MemberJoined(Payload):
    """A participant holds the coordinator's signed join receipt."""

    receipt: SignedDoc
    num_samples: int | None = None
    # the round's participant-level ε at the node's δ (None: ∞, no DP) and its topic, for the
    # privacy ledger (fedlearn/budget.py)
    topic: str | None = None
    epsilon: float | None = None
    delta: float | None = None


class Trained(Payload):
    """A participant finished local training; the delta is the blob `blob_sha`, kept for resends
    and takeover."""

    blob_sha: _SHA
    num_samples: int
    train_loss: float
    steps: int | None = None
    train_steps: int | None = None
    stopped_early: bool | None = None
    clip_bit: float | None = None  # adaptive clipping's noised bit (clipping.py)


class MemberShared(Payload):
    """A participant sealed its shares for its neighbours (kept so a restart resends the same
    bundle, not a new split)."""

    bundle: ShareBundle


class MemberRevealed(Payload):
    """A participant signed this unmask request: the one request it confirms and reveals for."""

    unmask_sha: _SHA


class MemberSubmitted(Payload):
    """A participant sent its signed submission (recorded so a restart resends, not retrains)."""

    submission: ParticipantSubmission
    blob_sha: _SHA


ROUND_EVENTS: dict[str, type[Payload]] = {
    "announced": Announced,
    "joined": Joined,
    "mask_key": MaskKey,
    "roster": Roster,
    "shares": Shares,
    "shares_closed": SharesClosed,
    "unmask": Unmask,
    "confirmed": Confirmed,
    "submitted": Submitted,
    "rejected": Rejected,
    "aggregating": RoundOnly,
    "aggregated": Aggregated,
    "completed": Completed,
    "aborted": Aborted,
}

MEMBER_EVENTS: dict[str, type[Payload]] = {
    "offered": Offered,
    "consent": ConsentGranted,
    "joined": MemberJoined,
    "shared": MemberShared,
    "trained": Trained,
    "revealed": MemberRevealed,
    "submitted": MemberSubmitted,
    "completed": Completed,
    "aborted": Aborted,
}


def member_event_type(suffix: str) -> str:
    """The log's type for a participant event (consent has a name of its own)."""
    return CONSENT_EVENT if suffix == "consent" else MEMBER_PREFIX + suffix
