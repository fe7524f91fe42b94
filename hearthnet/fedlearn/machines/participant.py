"""A participant's round as a pure state machine (docs/architecture.md, "Federated rounds").

Stages: offered → consented → joined → trained → submitted → completed | aborted (a secure
round announces a mask key and waits for the mask roster between trained and submitted). The
machine is fed the node's own participant events (`apply`: the log leads, memory follows, so a
restarted node folds its log into a fresh machine and continues with the same next step), the
answers to the calls it asked for (`reply`), training outcomes, the coordinator's round events
(`observe`), timers and results; it returns effects (`machines/effects.py`) and raises
`HearthnetError` for refusals. No I/O: the driver (`drivers/participant.py`) trains, calls,
stores and installs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hearthnet import constants as C
from hearthnet.canonical import sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn import events as ev
from hearthnet.fedlearn.budget import Ledger, PrivacyPolicy, check_join, round_epsilon, wire_epsilon
from hearthnet.fedlearn.machines.effects import Aggregate, Append, Call
from hearthnet.fedlearn.machines.member_effects import (
    ROSTER_TIMER,
    UNMASK_TIMER,
    MakeShares,
    NewMaskKey,
    ParticipantEffect,
    Submit,
    Train,
    TrainOutcome,
    Wait,
)
from hearthnet.fedlearn.machines.results import (
    Influence,
    Suspect,
    open_result,
    recompute_plan,
)
from hearthnet.fedlearn.machines.secure_member import SECURE_EVENTS, SecureSteps
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.masks import MaskingKey, MaskKeyAnnouncement
from hearthnet.fedlearn.protocol import (
    EnrollResponse,
    JoinReceipt,
    RoundResult,
    SignedDoc,
    SubmitReceipt,
)
from hearthnet.fedlearn.secagg import (
    SecAggRound,
)
from hearthnet.fedlearn.state import TERMINAL_STAGES, Membership, Stage
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.fedlearn.verify import check_recomputed
from hearthnet.identity import NodeIdentity

CAP = C.FEDLEARN_CAP_PREFIX


__all__ = [
    "ROSTER_TIMER",
    "UNMASK_TIMER",
    "MakeShares",
    "NewMaskKey",
    "ParticipantEffect",
    "ParticipantMachine",
    "Submit",
    "Train",
    "TrainOutcome",
    "Wait",
    "offer",
    "offered_event",
]


def offer(wire: dict[str, Any], caller: str, trusted: set[str]) -> SignedManifest:
    """A manifest offered by `caller`, if a coordinator this node trusts signed it and is the
    one offering it; `signature_invalid` (a `Suspect`) otherwise."""
    try:
        signed = SignedManifest.from_wire(wire, trusted)
        if signed.manifest.coordinator != caller:
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "manifest rejected")
    except HearthnetError:
        err = HearthnetError(ErrorCode.SIGNATURE_INVALID, "manifest rejected")
        raise Suspect(caller, "manifest", err) from None
    return signed


def offered_event(signed: SignedManifest) -> Append:
    """The log record of an accepted offer (the manifest's exact signed bytes)."""
    wire = SignedDoc.model_validate(signed.to_wire())
    return Append(ev.MEMBER_PREFIX + "offered", ev.Offered(round_id=signed.round_id, manifest=wire))


class ParticipantMachine(SecureSteps):
    """One round as this node takes part in it. `member` is the folded state (shared with the
    takeover code); the machine adds what lives in memory only (mask key, announcements)."""

    def __init__(
        self,
        identity: NodeIdentity,
        member: Membership,
        trust_roster: set[str],
        privacy: PrivacyPolicy | None = None,
    ):
        self.identity = identity  # signing is pure computation
        self.privacy = privacy or PrivacyPolicy()
        self.me = identity.node_id
        self.member = member
        self.trust_roster = trust_roster
        self.key: MaskingKey | None = None  # memory only, never logged or persisted
        self.announced = False
        self.anns: dict[str, MaskKeyAnnouncement] = {}
        self.refused: HearthnetError | None = None  # a mask roster this node will not mask with
        self.shares_sent = False  # memory only: a restart resends the recorded bundle
        self._plan: SecAggRound | None = None
        self._answered = 0  # unmask requests signed (of member.unmask_count)
        self._revealed_for = 0  # confirmed events answered (of member.confirm_count)
        self._progress = 0  # coordinator events seen; a wait ends when it moves
        self._waiting_from = 0
        self._pending: tuple[ParticipantSubmission, str] | None = None  # sent, not yet receipted

    def apply(self, suffix: str, payload: ev.Payload) -> None:
        """Fold one of this node's own participant events (after the driver stored it)."""
        self.member.apply(suffix, payload)

    # --- consent and join ------------------------------------------------------------------------

    def consent(self, granted: bool) -> list[Append]:
        """The operator's answer; the consent event once, `consent_required` without it."""
        if self.member.stage is not Stage.OFFERED:
            return []
        if not granted:
            raise HearthnetError(
                ErrorCode.CONSENT_REQUIRED,
                "the operator has not accepted this round's consent text",
            )
        text_sha = sha256_hex(self.signed.manifest.consent_text.encode("utf-8"))
        payload = ev.ConsentGranted(
            round_id=self.round_id,
            manifest_sha=self.signed.manifest_sha,
            consent_text_sha=text_sha,
        )
        return [self._append("consent", payload)]

    def enroll(self, trusted: set[str], ledger: Ledger | None = None) -> Call:
        """Ask the coordinator for a join receipt (after the manifest verifies again: the
        trust roster may have changed since the offer, and the round fits the node's privacy
        policy given `ledger`, the rounds this node already joined)."""
        m = self.signed.manifest
        try:
            self.signed.verify(trusted)
        except HearthnetError as err:
            raise Suspect(m.coordinator, "manifest", err) from None
        p = self.privacy
        check_join(ledger or {}, m, p.delta, p.budget, p.require_dp)
        body = {"round_id": self.round_id, "manifest_sha": self.signed.manifest_sha}
        return Call("enroll", m.coordinator, CAP + "round.enroll", body)

    def enrolled(self, response: EnrollResponse, num_samples: int) -> list[Append]:
        """The coordinator's receipt, if it is for this node and round."""
        receipt = response.receipt
        issued = receipt.open(JoinReceipt, self.signed.manifest.coordinator)
        if issued.participant != self.me or issued.round_id != self.round_id:
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "receipt rejected")
        m = self.signed.manifest
        delta = self.privacy.delta
        payload = ev.MemberJoined(
            round_id=self.round_id,
            receipt=receipt,
            num_samples=num_samples,
            topic=m.topic,
            epsilon=wire_epsilon(round_epsilon(m, delta)),
            delta=delta,
        )
        return [self._append("joined", payload)]

    # --- train, (mask,) submit -----------------------------------------------------------------

    def next(self) -> list[ParticipantEffect]:
        """The step to run now, from the stage alone (plus the in-memory round secrets and what
        the coordinator's events said): the same after a restart as before it. Empty: nothing
        to do but follow the coordinator."""
        m = self.member
        if not self.signed.manifest.secure:
            if m.stage is Stage.JOINED:
                return [Train(self.round_id)]
            if m.stage is Stage.TRAINED:
                assert m.trained_sha is not None
                return [Submit(self.round_id, m.trained_sha, None, None)]
            return []
        if m.stage not in (Stage.JOINED, Stage.TRAINED, Stage.SUBMITTED):
            return []
        return self._next_secure()

    def trained(self, outcome: TrainOutcome) -> list[Append]:
        """Training finished: record it (the delta is already stored)."""
        payload = ev.Trained(
            round_id=self.round_id,
            blob_sha=outcome.blob_sha,
            num_samples=outcome.num_samples,
            train_loss=outcome.train_loss,
            steps=outcome.steps,
            train_steps=self.signed.manifest.train_steps,
            stopped_early=outcome.stopped_early,
            clip_bit=outcome.clip_bit,
        )
        return [self._append("trained", payload)]

    def submission(self, data: bytes, blob_sha: str) -> Call:
        """Sign the submission of `data` (stored as `blob_sha`) and send it with the receipt."""
        m = self.member
        assert m.receipt is not None and m.num_samples is not None
        # a secure round weighs each member by the num_samples its key announced
        samples = m.roster[self.me].num_samples if m.roster is not None else m.num_samples
        sub = ParticipantSubmission.create(
            self.identity,
            self.round_id,
            data,
            samples,
            m.train_loss or 0.0,
            steps=m.steps,
            clip_bit=m.clip_bit,
        )
        self._pending = (sub, blob_sha)
        body = {"submission": sub.model_dump(), "receipt": m.receipt.model_dump()}
        return Call(
            "submit",
            self.signed.manifest.coordinator,
            CAP + "round.submit",
            body,
            blob=data,
            retry_until=self.signed.manifest.deadline_at,
        )

    def reply(self, name: str, body: Any) -> list[Append]:
        """The answer to a `Call` this machine asked for."""
        if name == "mask_key":
            self.announced = True
            return []
        if name == "shares":
            self.shares_sent = True
            return []
        if name in ("confirm", "reveal"):
            return []
        if name == "submit" and isinstance(body, SubmitReceipt) and self._pending is not None:
            sub, sha = self._pending
            self._pending = None
            payload = ev.MemberSubmitted(round_id=self.round_id, submission=sub, blob_sha=sha)
            return [self._append("submitted", payload)]
        raise HearthnetError(ErrorCode.PROTOCOL_ERROR, f"unexpected reply {name}")

    def settled(self) -> bool:
        """Something changed since the last wait (a coordinator event this machine uses), or
        the round ended here: time to ask `next()` again."""
        m = self.member
        return (
            self._progress != self._waiting_from
            or self.refused is not None
            or m.stage in TERMINAL_STAGES
        )

    def timer(self, name: str, now: datetime) -> None:
        """A timer fired: the mask roster and the share set had to close by the deadline, and
        the coordinator had to ask to unmask within its grace after it."""
        if self.settled() or now < self.signed.manifest.deadline_at:
            return
        if name == ROSTER_TIMER:
            raise HearthnetError(
                ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET, "the mask roster never closed"
            )
        if name == UNMASK_TIMER and self.member.unmask is None:
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                "the coordinator never asked to unmask this secure round (secure rounds are "
                "not taken over)",
            )

    def failed(self, err: HearthnetError) -> list[Append]:
        """The round failed here: record why, once."""
        if self.member.stage in TERMINAL_STAGES:
            return []
        reason = err.message[:200]
        payload = ev.Aborted(round_id=self.round_id, code=str(err.code), reason=reason)
        return [self._append("aborted", payload)]

    # --- following the coordinator ------------------------------------------------------------

    def observe(self, seq: int, event_type: str, payload: dict[str, Any]) -> list[Any]:
        """One of the coordinator's round events (in its log order). Returns effects: an
        `Append` (its abort mirrored here) or a result document to accept from it."""
        m = self.member
        if seq <= m.seen_seq or payload.get("round_id") != self.round_id:
            return []
        m.seen_seq = seq
        suffix = event_type.removeprefix(ev.ROUND_PREFIX)
        model = ev.ROUND_EVENTS.get(suffix)
        out: list[Any] = []
        event = model.model_validate(payload) if model is not None else None
        self._progress += 1
        if isinstance(event, ev.Joined):
            m.participants.add(event.participant)
        elif isinstance(event, SECURE_EVENTS):
            self.observe_secure(event)
        elif isinstance(event, ev.Completed):
            out.append(event.result)
        elif isinstance(event, ev.Aborted) and m.stage not in TERMINAL_STAGES:
            abort = ev.Aborted(round_id=self.round_id, code=event.code, reason=event.reason)
            out.append(self._append("aborted", abort))
        if suffix in ("aggregating", "completed", "aborted"):
            m.coordinator_phase = suffix
        return out

    # --- results -------------------------------------------------------------------------------

    def open_result(
        self, doc: SignedDoc, sender: str, takeover_turn: bool
    ) -> tuple[RoundResult, bool]:
        """A signed result from `sender`, and whether it is new here (`results.open_result`)."""
        return open_result(self.member, self.me, doc, sender, takeover_turn)

    def verify_result(
        self,
        result: RoundResult,
        held: dict[str, ParticipantSubmission],
        receipts: dict[str, SignedDoc],
        masks: dict[str, MaskKeyAnnouncement],
        influence: Influence,
    ) -> Aggregate | None:
        """Its listing checked; an `Aggregate` to recompute it when every listed submission
        is held here (feed the SHA to `recomputed`)."""
        return recompute_plan(self.member, self.me, result, held, receipts, masks, influence)

    def recomputed(self, result: RoundResult, sha: str) -> None:
        """The SHA this node's recomputation gave; `fedlearn_aggregation_failed` if another."""
        check_recomputed(result, sha)

    def completed(self, doc: SignedDoc) -> list[Append]:
        """The result checked, its adapter verified and stored: the round is done here."""
        if self.member.stage in TERMINAL_STAGES:
            return []
        return [self._append("completed", ev.Completed(round_id=self.round_id, result=doc))]
