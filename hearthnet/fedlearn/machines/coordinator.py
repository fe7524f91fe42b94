"""The coordinator of a round as a pure machine: announce, enroll, mask keys and roster,
submissions, timers and finalize (docs/architecture.md, "Federated rounds").

Every transition is an `effects.Append` first: the driver logs it and feeds the record back to
`apply`, which folds it into the round's `RoundRecord` (the same fold a restarted node runs over
its log) and answers what follows from it (a closed roster, a round with every submission in).
Who may join and what a submission must be is `admission.py`. Bad submissions are refused with
their code, recorded as `fedlearn.round.rejected`, and never stop the round. Refusals are raised
as `HearthnetError`; the machine never waits, reads a clock or touches a socket.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from hearthnet import constants as C
from hearthnet.config import NodeConfig
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event
from hearthnet.fedlearn import events as ev
from hearthnet.fedlearn.draft import carry_topic_clip
from hearthnet.fedlearn.machines import effects as fx
from hearthnet.fedlearn.machines import finalize
from hearthnet.fedlearn.machines.admission import (
    admit,
    check_announce,
    check_open,
    check_own_base_model,
    check_receipt,
    check_submission,
)
from hearthnet.fedlearn.machines.secure_rounds import SecureRounds
from hearthnet.fedlearn.manifest import RoundID, RoundManifestDraft, SignedManifest, format_ts
from hearthnet.fedlearn.masks import MaskKeyAnnouncement
from hearthnet.fedlearn.protocol import JoinReceipt, SignedDoc, SubmitReceipt
from hearthnet.fedlearn.publish import Aggregate
from hearthnet.fedlearn.shares import Reveal, ShareBundle
from hearthnet.fedlearn.state import (
    ROUND_PREFIX,
    Phase,
    RoundRecord,
    fold_rounds,
    signed_manifest,
)
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.identity import NodeIdentity

DEADLINE = "deadline:"
ROSTER = "roster:"
SHARES = "shares:"


def _timers(record: RoundRecord) -> list[fx.Effect]:
    """The deadline timer, and a secure round's roster timer at its fraction of the span."""
    m = record.signed.manifest
    out: list[fx.Effect] = [fx.SetTimer(DEADLINE + record.round_id, m.deadline_at)]
    if m.secure and record.shared is None:
        span = (m.deadline_at - m.created_at_dt).total_seconds()
        for name, fraction in (
            (ROSTER, C.FEDLEARN_SECURE_ROSTER_FRACTION),
            (SHARES, C.FEDLEARN_SECURE_SHARES_FRACTION),
        ):
            at = m.created_at_dt + timedelta(seconds=span * fraction)
            out.append(fx.SetTimer(name + record.round_id, at))
    return out


def _all_in(record: RoundRecord) -> bool:
    """Every expected member (the share set, or everyone who joined) has submitted."""
    m = record.signed.manifest
    if m.secure:
        expected = set(record.shared) if record.shared is not None else None
    else:
        expected = set(record.joined)
    if expected is None:
        return False
    return len(expected) >= m.min_participants and expected <= set(record.submissions)


class CoordinatorMachine:
    """Every round this node coordinates, as the fold of its log plus the rules for what may
    happen next."""

    def __init__(self, identity: NodeIdentity, config: NodeConfig):
        self.identity = identity
        self.config = config
        self.rounds: dict[str, RoundRecord] = {}
        self.secure = SecureRounds()  # memory only: graphs, signatures, reveals

    @property
    def node_id(self) -> str:
        """This node's ID (the coordinator of every round in `rounds`)."""
        return self.identity.node_id

    def get(self, round_id: str) -> RoundRecord:
        """The round, or `bad_request` if this node does not coordinate it."""
        record = self.rounds.get(round_id)
        if record is None:
            raise HearthnetError(ErrorCode.BAD_REQUEST, f"no round {round_id} coordinated here")
        return record

    # --- the log ----------------------------------------------------------------------------------

    def apply(self, event_type: str, payload: ev.Payload) -> list[fx.Effect]:
        """Fold one appended event; return what follows from it."""
        suffix = event_type.removeprefix(ROUND_PREFIX)
        if isinstance(payload, ev.Announced):
            record = RoundRecord(signed_manifest(payload.manifest))
            self.rounds[record.round_id] = record
            return _timers(record)
        record = self.get(payload.round_id)
        record.apply(suffix, payload)
        if isinstance(payload, ev.MaskKey):
            return self.secure.maybe_close_roster(record, timer=False)
        if isinstance(payload, ev.Shares):
            return self.secure.maybe_close_shares(record, timer=False)
        if isinstance(payload, ev.Submitted) and _all_in(record):
            return [fx.Finalize(record.round_id)]
        return []

    def restore(self, events: list[Event]) -> list[fx.Effect]:
        """Rebuild every round from the log and say how each carries on."""
        self.rounds = fold_rounds(events)
        out: list[fx.Effect] = []
        for record in self.rounds.values():
            if record.phase is Phase.ANNOUNCED:
                out += _timers(record)
            elif record.phase in (Phase.UNMASKING, Phase.AGGREGATING):
                out.append(fx.Finalize(record.round_id))
        return out

    def timer(self, name: str, now: datetime) -> list[fx.Effect]:
        """A timer set by this machine fired."""
        kind, _, round_id = name.partition(":")
        record = self.rounds.get(round_id)
        if record is None or record.phase is not Phase.ANNOUNCED:
            return []
        if kind + ":" == DEADLINE:
            return [fx.Finalize(round_id)]
        if kind + ":" == SHARES:
            return self.secure.maybe_close_shares(record, timer=True)
        return self.secure.maybe_close_roster(record, timer=True)

    # --- announce and join ------------------------------------------------------------------------

    def announce(
        self,
        draft: RoundManifestDraft,
        base_model_sha: str,
        now: datetime,
        round_id: RoundID,
    ) -> tuple[SignedManifest, list[fx.Effect]]:
        """Sign a new round over this node's base model (`round_id` is drawn by the driver)."""
        check_announce(len(self.rounds), self.config, draft.secure)
        draft = carry_topic_clip(draft, self.rounds.values())  # adaptive clipping (issue 15)
        signed = draft.build(self.identity, self.config.fedlearn, now=now, round_id=round_id)
        check_own_base_model(signed, base_model_sha)
        payload = ev.Announced(
            round_id=signed.manifest.round_id, manifest=SignedDoc.model_validate(signed.to_wire())
        )
        return signed, [
            fx.round_append("announced", payload),
            fx.Log(
                "info",
                "round announced",
                {"round_id": payload.round_id, "topic": signed.manifest.topic},
            ),
        ]

    def enroll(
        self,
        caller: str,
        round_id: str,
        manifest_sha: str,
        now: datetime,
        score: float,
        banned: bool,
    ) -> tuple[SignedDoc, list[fx.Effect]]:
        """The coordinator's half of join: admit `caller` (its reputation `score`, `banned` by
        this node's threshold) and sign its receipt."""
        record = self.get(round_id)
        admit(record, self.config, self.node_id, caller, manifest_sha, score, banned)
        if caller in record.joined:
            return record.joined[caller], []
        check_open(record, now)
        receipt = SignedDoc.sign(
            self.identity,
            JoinReceipt(
                round_id=round_id,
                manifest_sha=record.signed.manifest_sha,
                participant=caller,
                coordinator=self.node_id,
                issued_at=format_ts(now),
                reputation=round(score, 6),
            ),
        )
        return receipt, [
            fx.round_append(
                "joined", ev.Joined(round_id=round_id, participant=caller, receipt=receipt)
            ),
            fx.Log("info", "participant joined", {"round_id": round_id, "participant": caller}),
        ]

    def check_receipt(self, record: RoundRecord, participant: str, receipt: SignedDoc) -> None:
        """`forbidden` unless `receipt` is this node's receipt for `participant` in the round."""
        check_receipt(record, self.node_id, participant, receipt)

    # --- secure rounds (machines/secure_rounds.py) ------------------------------------------------

    def accept_mask_key(self, caller: str, ann: MaskKeyAnnouncement) -> list[fx.Effect]:
        """A joined participant's mask key for a secure round (idempotent)."""
        return self.secure.accept_mask_key(self.get(ann.round_id), caller, ann)

    def accept_shares(self, caller: str, bundle: ShareBundle) -> list[fx.Effect]:
        """A roster member's signed share bundle while the share phase is open (idempotent)."""
        return self.secure.accept_shares(self.get(bundle.round_id), caller, bundle)

    def accept_confirm(
        self, caller: str, round_id: str, unmask_sha: str, signature: str
    ) -> list[fx.Effect]:
        """A survivor's signature on the unmask request."""
        return self.secure.accept_confirm(self.get(round_id), caller, unmask_sha, signature)

    def accept_reveal(self, caller: str, rev: Reveal) -> bool:
        """A survivor's reveal; True once every needed secret can be recovered."""
        return self.secure.accept_reveal(self.get(rev.round_id), caller, rev)

    def unmasking(self, round_id: str) -> bool:
        """A secure round waiting for reveals."""
        return self.secure.unmasking(self.get(round_id))

    # --- submissions ------------------------------------------------------------------------------

    def check_submission(
        self,
        caller: str,
        sub: ParticipantSubmission,
        receipt: SignedDoc,
        data: bytes,
        now: datetime,
    ) -> None:
        """Owner, signature, receipt, deadline, duplicate, steps, size and roster, in that
        order; the payload itself (`check_payload`, blocking) is the driver's to run next."""
        record = self.get(sub.round_id)
        limit = self.config.fedlearn.submission_max_bytes
        check_submission(record, self.node_id, caller, sub, receipt, data, now, limit)

    def reject(self, round_id: str, caller: str, err: HearthnetError) -> list[fx.Effect]:
        """A refused submission: logged, and recorded when the caller had joined."""
        record = self.get(round_id)
        out: list[fx.Effect] = [
            fx.Log(
                "warning",
                "submission rejected",
                {
                    "round_id": round_id,
                    "participant": caller,
                    "code": str(err.code),
                    "reason": err.message,
                },
            )
        ]
        if caller in record.joined:
            payload = ev.Rejected(
                round_id=round_id, participant=caller, code=str(err.code), reason=err.message[:200]
            )
            out.append(fx.round_append("rejected", payload))
        return out

    def submitted(
        self, sub: ParticipantSubmission, data: bytes, blob_sha: str, now: datetime
    ) -> tuple[SubmitReceipt, list[fx.Effect]]:
        """A checked submission: store its bytes, record it, answer the participant."""
        payload = ev.Submitted(
            round_id=sub.round_id, participant=sub.participant, submission=sub, blob_sha=blob_sha
        )
        answer = SubmitReceipt(
            round_id=sub.round_id,
            participant=sub.participant,
            delta_sha=sub.delta_sha,
            accepted_at=format_ts(now),
        )
        return answer, [
            fx.StoreBlob(data),
            fx.round_append("submitted", payload),
            fx.Log(
                "info",
                "submission accepted",
                {"round_id": sub.round_id, "participant": sub.participant},
            ),
        ]

    # --- finalize ---------------------------------------------------------------------------------

    def close(self, round_id: str) -> tuple[SignedDoc | None, list[fx.Effect]]:
        """Start closing: the stored result if there is one, the abort if it was aborted, else
        the `aggregating` event (unless already aggregating)."""
        record = self.get(round_id)
        if record.phase is Phase.COMPLETED and record.result is not None:
            return record.result, []
        if record.phase is Phase.ABORTED:
            assert record.abort is not None
            raise HearthnetError(ErrorCode(record.abort["code"]), record.abort["reason"])
        secure = record.signed.manifest.secure
        if record.phase is Phase.ANNOUNCED and secure and record.shared is not None:
            return None, self.secure.unmask(record)
        if record.phase is Phase.UNMASKING:
            if not self.secure.requested(record):
                return None, self.secure.unmask(record)
            if not self.secure.reveals_ready(record):
                return None, []  # the driver waits for reveals (`unmasking`)
            return None, [fx.round_append("aggregating", ev.RoundOnly(round_id=round_id))]
        if record.phase is Phase.ANNOUNCED:
            return None, [fx.round_append("aggregating", ev.RoundOnly(round_id=round_id))]
        return None, []

    def plan(self, round_id: str) -> finalize.Abort | fx.Aggregate:
        """What to aggregate, or why the round aborts (the shared `finalize.plan`); a secure
        round's secrets are recovered from the reveals first."""
        record = self.get(round_id)
        unmasked = None
        if record.signed.manifest.secure and record.unmask is not None:
            try:
                unmasked = self.secure.recover(record)
            except HearthnetError as err:
                return finalize.aggregation_failed(err)
        survivors = set(unmasked.request.survivors) if unmasked is not None else None
        subs = {p: s for p, s in record.submissions.items() if survivors is None or p in survivors}
        return finalize.plan(record.signed, subs, record.joined, unmasked)

    def abort(self, round_id: str, why: finalize.Abort) -> list[fx.Effect]:
        """End the round without a result."""
        payload = ev.Aborted(round_id=round_id, code=str(why.code), reason=why.reason[:200])
        return [
            fx.round_append("aborted", payload),
            fx.Log("warning", "round aborted", {"round_id": round_id, "reason": why.reason}),
        ]

    def aggregated(
        self, round_id: str, agg: Aggregate, now: datetime
    ) -> tuple[SignedDoc, list[fx.Effect]]:
        """Publish the aggregate: store the adapter, record it, the reputation changes (before
        `completed`, so a finished round always has them; a round is recorded once), then the
        signed result."""
        record = self.get(round_id)
        rejected = record.rejections()
        excluded = finalize.exclusions(rejected, record.joined, agg.included)
        done = finalize.publish(record.signed, agg, self.identity, now, excluded, rejected)
        return done.doc, [
            fx.StoreBlob(done.adapter),
            fx.round_append(
                "aggregated", ev.Aggregated(round_id=round_id, adapter_sha=done.adapter_sha)
            ),
            fx.RecordReputation(round_id, done.observed),
            fx.round_append("completed", ev.Completed(round_id=round_id, result=done.doc)),
            fx.Log(
                "info",
                "round completed",
                {
                    "round_id": round_id,
                    "adapter_sha": done.adapter_sha,
                    "participants": len(done.included),
                },
            ),
        ]
