"""Round messages (docs/architecture.md): capability requests and responses, and signed documents.

Pure data: no I/O. Signed documents (join receipts, round results) are JCS-canonical JSON signed
with Ed25519 and travel as `{body, signature}`; receivers verify the exact bytes, then parse them
(never a re-serialisation), the same way manifests do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hearthnet import constants as C
from hearthnet.canonical import canonical_bytes, parse_canonical, sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.masks import MaskKeyAnnouncement
from hearthnet.fedlearn.shares import Reveal, ShareBundle
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.identity import NodeID, NodeIdentity, verify

Sha = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
RoundIdField = Annotated[str, Field(min_length=26, max_length=26)]
NodeIdField = Annotated[str, Field(min_length=1, max_length=128)]
Scope = Literal["session", "node"]
M = TypeVar("M", bound=BaseModel)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- signed documents ---------------------------------------------------------------------------


class SignedDoc(_Msg):
    """JCS body and its Ed25519 signature, as sent."""

    body: Annotated[str, Field(max_length=C.FEDLEARN_SIGNED_DOC_MAX_CHARS)]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]

    @classmethod
    def sign(cls, identity: NodeIdentity, document: BaseModel) -> SignedDoc:
        """Sign `document`'s canonical JSON (JCS) with this node's key; the body is kept as sent
        so its hash and signature check on every machine."""
        body = canonical_bytes(document.model_dump(mode="json"))
        return cls(body=body.decode("utf-8"), signature=identity.sign(body).hex())

    @property
    def sha(self) -> str:
        """SHA-256 of the exact body: the document's identity (a manifest's `manifest_sha`)."""
        return sha256_hex(self.body.encode("utf-8"))

    def open(self, model: type[M], signer: str) -> M:
        """The document, if `signer` signed these exact bytes; `signature_invalid` otherwise."""
        body = self.body.encode("utf-8")
        if not verify(NodeID(signer), body, bytes.fromhex(self.signature)):
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "signature does not verify")
        try:
            return model.model_validate(parse_canonical(body))
        except (HearthnetError, ValidationError):
            raise HearthnetError(
                ErrorCode.SIGNATURE_INVALID, "signed document is malformed"
            ) from None

    def claimed(self, model: type[M]) -> M:
        """Parse without verifying — only to learn who claims to have signed it."""
        try:
            return model.model_validate(parse_canonical(self.body.encode("utf-8")))
        except (HearthnetError, ValidationError):
            raise HearthnetError(
                ErrorCode.SIGNATURE_INVALID, "signed document is malformed"
            ) from None


class JoinReceipt(_Msg):
    """The coordinator's participation token (docs/architecture.md): binds one participant to one
    round; a submission must present it."""

    kind: Literal["hearthnet.fedlearn.receipt/1"] = "hearthnet.fedlearn.receipt/1"
    round_id: RoundIdField
    manifest_sha: Sha
    participant: NodeIdField
    coordinator: NodeIdField
    issued_at: str
    # the coordinator's reputation score for the participant at enrolment: the influence a
    # `reputation_weighted` rule gives it, fixed here so a takeover node weighs it the same
    reputation: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.5


class Exclusion(_Msg):
    """A participant the aggregator left out of a result, and why (in `RoundResult.excluded`)."""

    participant: NodeIdField
    reason: Annotated[str, Field(max_length=256)]


class AuditEntry(_Msg):
    """What the aggregation rule did with one included participant's update (`robust.Verdict`)."""

    participant: NodeIdField
    action: Literal["kept", "down_weighted", "clipped", "excluded"]
    influence: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    deviation: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    reason: Annotated[str, Field(max_length=256)]


class SubmissionRef(_Msg):
    """One included submission as the aggregator used it, with its participant's signature, so
    an aggregator cannot list an entry nobody signed, and anyone holding another signed
    submission of that participant sees the conflict."""

    participant: NodeIdField
    delta_sha: Sha
    num_samples: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_NUM_SAMPLES)]
    steps: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_TRAIN_STEPS)] | None = None
    clip_bit: Annotated[float, Field(allow_inf_nan=False)] | None = None  # adaptive clipping
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]


class RoundResult(_Msg):
    """A round's signed outcome (README.md, "Federated rounds"): the adapter's hash and where to
    fetch it, the rule, who was included and excluded (and why), what the rule did with each
    included update, and whether a takeover node produced it."""

    kind: Literal["hearthnet.fedlearn.result/1"] = "hearthnet.fedlearn.result/1"
    round_id: RoundIdField
    manifest_sha: Sha
    aggregated_delta_sha: Sha
    n_participants: int
    total_samples: int
    aggregator: NodeIdField
    completed_at: str
    download_url: str
    rule: str
    lora_aggregation: str
    secure: bool
    included: list[NodeIdField]
    excluded: list[Exclusion]
    takeover: bool
    rule_params: dict[str, Any] = {}
    audit: list[AuditEntry] = []  # empty for secure rounds: no individual update is seen
    submissions: list[SubmissionRef] = []  # one per `included`, in the same order


# --- capability bodies --------------------------------------------------------------------------


class Empty(_Msg):
    """A request or response with no fields."""


class Ack(_Msg):
    """The answer of a call whose only news is that it was taken."""

    ok: bool = True


class AnnounceRequest(_Msg):
    """A draft (the fields of `RoundManifestDraft`), checked by the coordinator."""

    draft: dict[str, Any]


class AnnounceResponse(_Msg):
    """The coordinator's answer to `round.announce`: the new round and the peers it was offered
    to."""

    round_id: str
    manifest_sha: str
    offered_to: list[str]


class OfferRequest(_Msg):
    """A coordinator's signed manifest, as `SignedManifest.to_wire` writes it."""

    manifest: SignedDoc


class ListRequest(_Msg):
    """`round.list`: the rounds known here, optionally one topic's."""

    topic: Annotated[str, Field(max_length=C.FEDLEARN_TOPIC_MAX_LEN)] | None = None


class RoundSummary(_Msg):
    """One round in a `round.list` or `round.pending` answer, as this node sees it."""

    round_id: str
    topic: str
    coordinator: str
    deadline: str
    phase: str
    role: str
    manifest: dict[str, Any]


class ListResponse(_Msg):
    """The answer to `round.list`."""

    rounds: list[RoundSummary]


class RoundRef(_Msg):
    """Names a round: the body of `round.finalize`, `round.finalize_takeover` and the answer to
    `round.offer`."""

    round_id: RoundIdField


class JoinRequest(_Msg):
    """The operator's `round.join`: consent (required) to train on this node's text for the
    round."""

    round_id: RoundIdField
    consent: bool = False


class JoinResponse(_Msg):
    """The answer to `round.join`: the coordinator's signed receipt and the log seq of the
    consent event."""

    round_id: str
    receipt: SignedDoc
    consent_event_seq: int


class EnrollRequest(_Msg):
    """A participant asks the coordinator (`round.enroll`) to admit it to a round whose manifest
    it holds."""

    round_id: RoundIdField
    manifest_sha: Sha


class EnrollResponse(_Msg):
    """The coordinator's signed join receipt, which the participant later shows with its
    submission."""

    receipt: SignedDoc


class MaskKeyRequest(_Msg):
    """A participant sends a secure round's signed mask-key announcement to the coordinator
    (`round.mask_key`)."""

    announcement: MaskKeyAnnouncement


class SharesRequest(_Msg):
    """A roster member sends its signed, sealed share bundle to the coordinator
    (`round.shares`)."""

    bundle: ShareBundle


class ConfirmRequest(_Msg):
    """A survivor signs the one unmask request it will reveal for (`round.confirm`)."""

    round_id: Annotated[str, Field(min_length=26, max_length=26)]
    unmask_sha: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]


class RevealRequest(_Msg):
    """A share-set member answers the unmask request (`round.reveal`)."""

    reveal: Reveal


class SubmitRequest(_Msg):
    """The delta (or masked vector) travels as the call's blob."""

    submission: ParticipantSubmission
    receipt: SignedDoc


class SubmitReceipt(_Msg):
    """The coordinator's answer to `round.submit`: the submission was stored and counts."""

    round_id: str
    participant: str
    delta_sha: str
    accepted_at: str


class StatusRequest(_Msg):
    """`round.status`: a round's state now, or (`wait`) once it ends or `timeout_s` passes."""

    round_id: RoundIdField
    wait: bool = False
    timeout_s: Annotated[float, Field(gt=0, le=C.FEDLEARN_STATUS_WAIT_MAX_S)] = 60.0


class RoundStatus(_Msg):
    """A round's state as this node sees it (coordinator or participant), for `round.status`."""

    round_id: str
    phase: str
    role: str
    stage: str | None
    coordinator: str
    deadline: str
    joined: list[str]
    submitted: list[str]
    rejected: list[dict[str, str]]
    result: SignedDoc | None
    abort: dict[str, str] | None
    train_steps: int = 0  # requested by the manifest
    # training steps each participant ran, from its signed submission (the coordinator) or its
    # own training (a participant); None for a submission made before steps were reported
    steps: dict[str, int | None] = {}


class ReputationRow(_Msg):
    """One participant's standing in this node's reputation table."""

    participant: str
    score: float
    influence: float
    banned: bool
    rounds: int
    last_round: str


class PrivacyTopic(_Msg):
    """One topic of this node's privacy ledger: the rounds it joined and their composed ε
    (None: ∞, some round had no DP)."""

    topic: str
    rounds: list[str]
    epsilon: float | None


class PrivacyOffer(_Msg):
    """A round offered here and not yet joined: its ε, the topic's ε if joined, and whether
    this node's policy would let it join (`refusal` says why not)."""

    round_id: str
    topic: str
    epsilon: float | None
    topic_epsilon_after: float | None
    refusal: str | None = None


class PrivacyResponse(_Msg):
    """The answer to `privacy`: the ledger per topic at the node's δ, its budget (None:
    unlimited) and the offers waiting."""

    delta: float
    budget: float | None
    require_dp: bool
    topics: list[PrivacyTopic]
    offers: list[PrivacyOffer]


class ReputationResponse(_Msg):
    """The answer to `reputation`: this node's table and the score below which it bans."""

    ban_threshold: float
    participants: list[ReputationRow]


class ResultPush(_Msg):
    """A signed `RoundResult`, pushed to participants (`round.result`) or returned by a finalize."""

    result: SignedDoc


class HandoverRequest(_Msg):
    """A takeover node asks a participant for its submission, showing its own join receipt."""

    round_id: str
    receipt: SignedDoc


class HandoverResponse(_Msg):
    """A participant's own signed submission and receipt, for a takeover node; the delta (or
    masked vector) is the blob."""

    submission: ParticipantSubmission
    receipt: SignedDoc
    masks: list[MaskKeyAnnouncement]


class FetchRequest(_Msg):
    """`adapter.fetch`: a published adapter by SHA; the answer's blob carries it."""

    sha: Sha


class FetchResponse(_Msg):
    """Names the adapter blob that follows the answer to `adapter.fetch`."""

    sha: str
    size: int


class EvaluateRequest(_Msg):
    """The operator's `adapter.evaluate`: judge an adapter on this node's held-out text."""

    sha: Sha


class EvaluationReport(_Msg):
    """Held-out perplexity of this node's own text with and without an adapter; None where it
    is not finite (an adapter that breaks the model: it never passes)."""

    sha: str
    round_id: str
    topic: str
    texts: int
    perplexity_base: float | None
    perplexity_adapter: float | None
    ratio: float | None
    max_ratio: float
    passes: bool
    event_seq: int


class ApplyRequest(_Msg):
    """The operator's `adapter.apply`: use an adapter in a session or as the node's default."""

    sha: Sha
    scope: Scope = "session"
    force: bool = False  # node scope: apply even if the held-out check fails or cannot run


class ApplyReceipt(_Msg):
    """What `adapter.apply` did: where the adapter is now used and the evaluation that allowed
    it."""

    sha: str
    scope: str
    session_id: str | None
    node_default: str | None
    evaluation: EvaluationReport | None = None
    forced: bool = False


class PendingResponse(_Msg):
    """The answer to `round.pending`: offered rounds waiting for the operator's consent."""

    rounds: list[RoundSummary]
