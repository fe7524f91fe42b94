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
from hearthnet.fedlearn import secagg
from hearthnet.fedlearn.draft import carry_topic_clip
from hearthnet.fedlearn.machines import effects as fx
from hearthnet.fedlearn.machines import finalize
from hearthnet.fedlearn.machines.admission import (
    admit,
    check_announce,
    check_mask_key,
    check_open,
    check_own_base_model,
    check_receipt,
    check_submission,
    roster_to_close,
)
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
from hearthnet.identity import NodeID, NodeIdentity, verify

DEADLINE = "deadline:"
ROSTER = "roster:"
SHARES = "shares:"


def _append(suffix: str, payload: ev.Payload) -> fx.Append:
    return fx.Append(ROUND_PREFIX + suffix, payload)


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
        # secure rounds, memory only: the public SecAgg+ structure, the reveals received (secret
        # shares: never logged) and which unmask requests were (re)issued since this start
        self._plans: dict[str, secagg.SecAggRound] = {}
        self.reveals: dict[str, dict[str, Reveal]] = {}
        self.confirms: dict[str, dict[str, str]] = {}  # survivors' signatures on the request
        self._requested: set[str] = set()

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
            return self._maybe_close_roster(record, timer=False)
        if isinstance(payload, ev.Shares):
            return self._maybe_close_shares(record, timer=False)
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
            return self._maybe_close_shares(record, timer=True)
        return self._maybe_close_roster(record, timer=True)

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
            _append("announced", payload),
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
            _append("joined", ev.Joined(round_id=round_id, participant=caller, receipt=receipt)),
            fx.Log("info", "participant joined", {"round_id": round_id, "participant": caller}),
        ]

    def check_receipt(self, record: RoundRecord, participant: str, receipt: SignedDoc) -> None:
        """`forbidden` unless `receipt` is this node's receipt for `participant` in the round."""
        check_receipt(record, self.node_id, participant, receipt)

    # --- secure rounds: mask keys -----------------------------------------------------------------

    def accept_mask_key(self, caller: str, ann: MaskKeyAnnouncement) -> list[fx.Effect]:
        """A joined participant's mask key for a secure round (idempotent)."""
        if not check_mask_key(self.get(ann.round_id), caller, ann):
            return []  # announced before: the same key again
        return [_append("mask_key", ev.MaskKey(round_id=ann.round_id, announcement=ann))]

    def _maybe_close_roster(self, record: RoundRecord, timer: bool) -> list[fx.Effect]:
        """Close the roster once every place is taken, or at the roster timer with at least
        `min_participants` keys."""
        participants = roster_to_close(record, timer)
        if participants is None:
            return []
        n = len(participants)
        plan = secagg.SecAggRound.build(
            record.signed.manifest,
            record.signed.manifest_sha,
            {p: record.masks[p] for p in participants},
        )
        payload = ev.Roster(round_id=record.round_id, participants=participants, graph=plan.graph())
        return [
            _append("roster", payload),
            fx.Log(
                "info",
                "mask roster closed",
                {"round_id": record.round_id, "participants": n, "graph": plan.graph()},
            ),
        ]

    def secagg_plan(self, record: RoundRecord) -> secagg.SecAggRound:
        """The closed roster's SecAgg+ structure (graph, thresholds), derived once."""
        plan = self._plans.get(record.round_id)
        if plan is None:
            assert record.roster is not None
            roster = {p: record.masks[p] for p in record.roster}
            plan = secagg.SecAggRound.build(
                record.signed.manifest, record.signed.manifest_sha, roster
            )
            self._plans[record.round_id] = plan
        return plan

    def accept_shares(self, caller: str, bundle: ShareBundle) -> list[fx.Effect]:
        """A roster member's signed share bundle while the share phase is open (idempotent)."""
        record = self.get(bundle.round_id)
        if not record.signed.manifest.secure or record.roster is None:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "the round has no closed mask roster")
        secagg.check_bundle(self.secagg_plan(record), caller, bundle)
        if caller in record.bundles:
            if record.bundles[caller] != bundle:
                raise HearthnetError(ErrorCode.BAD_REQUEST, "shares were already sent")
            return []
        if record.shared is not None or record.phase is not Phase.ANNOUNCED:
            raise HearthnetError(ErrorCode.ROUND_CLOSED, "the share phase is closed")
        return [_append("shares", ev.Shares(round_id=record.round_id, bundle=bundle))]

    def _maybe_close_shares(self, record: RoundRecord, timer: bool) -> list[fx.Effect]:
        """Close the share phase once every roster member sent its shares, or at its timer."""
        if record.roster is None or record.shared is not None:
            return []
        if not timer and set(record.bundles) != set(record.roster):
            return []
        shared = sorted(record.bundles)
        return [
            _append(
                "shares_closed", ev.SharesClosed(round_id=record.round_id, participants=shared)
            ),
            fx.Log(
                "info",
                "share phase closed",
                {"round_id": record.round_id, "participants": len(shared)},
            ),
        ]

    def accept_confirm(
        self, caller: str, round_id: str, unmask_sha: str, signature: str
    ) -> list[fx.Effect]:
        """A survivor's signature on the unmask request; once every survivor's is in, the
        `confirmed` event that lets members reveal."""
        record = self.get(round_id)
        req = record.unmask
        if record.phase is not Phase.UNMASKING or req is None:
            raise HearthnetError(ErrorCode.ROUND_CLOSED, "the round is not unmasking")
        if unmask_sha != req.sha or caller not in req.survivors:
            raise HearthnetError(ErrorCode.FORBIDDEN, "confirmations come from listed survivors")
        if not verify(
            NodeID(caller), secagg.confirm_bytes(round_id, req.sha), bytes.fromhex(signature)
        ):
            raise HearthnetError(
                ErrorCode.SIGNATURE_INVALID, "the confirmation is not the caller's"
            )
        held = self.confirms.setdefault(round_id, {})
        if caller in held:
            return []
        held[caller] = signature
        if set(held) != set(req.survivors):
            return []
        payload = ev.Confirmed(round_id=round_id, unmask_sha=req.sha, signatures=dict(held))
        return [_append("confirmed", payload)]

    def accept_reveal(self, caller: str, rev: Reveal) -> bool:
        """A share-set member's reveal for the open unmask request (the same one again: no
        change); True once every secret the request needs can be recovered."""
        record = self.get(rev.round_id)
        if record.phase is not Phase.UNMASKING or record.unmask is None:
            raise HearthnetError(ErrorCode.ROUND_CLOSED, "the round is not unmasking")
        plan = self.secagg_plan(record)
        secagg.check_reveal(plan, record.unmask, caller, rev, record.bundles)
        held = self.reveals.setdefault(rev.round_id, {})
        if caller in held and held[caller] != rev:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "a reveal was already sent")
        held[caller] = rev
        return self.reveals_ready(rev.round_id)

    def reveals_ready(self, round_id: str) -> bool:
        """Whether the reveals in hand recover every secret the unmask request needs."""
        record = self.get(round_id)
        if record.unmask is None:
            return False
        held = self.reveals.get(round_id, {})
        return secagg.ready(self.secagg_plan(record), record.unmask, held)

    def unmasking(self, round_id: str) -> bool:
        """A secure round waiting for reveals."""
        record = self.get(round_id)
        return record.phase is Phase.UNMASKING and not self.reveals_ready(round_id)

    def _unmask(self, record: RoundRecord) -> list[fx.Effect]:
        """The unmask request (again, unchanged, after a restart), or nothing when the
        survivors are too few to reveal a sum of (the round then aborts at `plan`)."""
        rid = record.round_id
        req = record.unmask
        if req is None:
            assert record.shared is not None
            plan = self.secagg_plan(record)
            req = secagg.unmask_request(plan, record.shared, list(record.submissions))
            try:
                secagg.check_unmask(self.secagg_plan(record), record.shared, req)
            except HearthnetError:
                return [_append("aggregating", ev.RoundOnly(round_id=rid))]
        self._requested.add(rid)
        self.confirms.pop(rid, None)  # a repeated request is confirmed anew
        return [
            _append("unmask", ev.Unmask(round_id=rid, request=req)),
            fx.Log(
                "info",
                "unmask requested",
                {"round_id": rid, "survivors": len(req.survivors), "dropped": len(req.dropped)},
            ),
        ]

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
            out.append(_append("rejected", payload))
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
            _append("submitted", payload),
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
            return None, self._unmask(record)
        if record.phase is Phase.UNMASKING:
            if round_id not in self._requested:
                return None, self._unmask(record)
            if not self.reveals_ready(round_id):
                return None, []  # the driver waits for reveals (`unmasking`)
            return None, [_append("aggregating", ev.RoundOnly(round_id=round_id))]
        if record.phase is Phase.ANNOUNCED:
            return None, [_append("aggregating", ev.RoundOnly(round_id=round_id))]
        return None, []

    def plan(self, round_id: str) -> finalize.Abort | fx.Aggregate:
        """What to aggregate, or why the round aborts (the shared `finalize.plan`); a secure
        round's secrets are recovered from the reveals first."""
        record = self.get(round_id)
        unmasked = None
        if record.signed.manifest.secure and record.unmask is not None:
            held = self.reveals.get(round_id, {})
            try:
                unmasked = secagg.recover_all(self.secagg_plan(record), record.unmask, held)
            except HearthnetError as err:
                return finalize.aggregation_failed(err)
        survivors = set(unmasked.request.survivors) if unmasked is not None else None
        subs = {p: s for p, s in record.submissions.items() if survivors is None or p in survivors}
        return finalize.plan(record.signed, subs, record.joined, unmasked)

    def abort(self, round_id: str, why: finalize.Abort) -> list[fx.Effect]:
        """End the round without a result."""
        payload = ev.Aborted(round_id=round_id, code=str(why.code), reason=why.reason[:200])
        return [
            _append("aborted", payload),
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
            _append("aggregated", ev.Aggregated(round_id=round_id, adapter_sha=done.adapter_sha)),
            fx.RecordReputation(round_id, done.observed),
            _append("completed", ev.Completed(round_id=round_id, result=done.doc)),
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
