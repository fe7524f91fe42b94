"""The coordinator side of a round (spec M28 §4.3, §5): announce, enroll, collect, aggregate,
publish. Every transition is an event on the node's log first; memory is only a fold of it.

Join receipts are the participation tokens (spec §9, M16): signed by the coordinator, bound to
one participant and one round; a submission without a valid one is refused. Bad submissions are
refused with their code, recorded as `fedlearn.round.rejected`, and never stop the round.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.run import (
    aggregate_submissions,
    check_payload,
    observations,
    receipt_influence,
)
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.manifest import RoundManifestDraft, SignedManifest, format_ts
from hearthnet.fedlearn.masks import MaskKeyAnnouncement, check_roster
from hearthnet.fedlearn.protocol import (
    Exclusion,
    JoinReceipt,
    SignedDoc,
    SubmitReceipt,
)
from hearthnet.fedlearn.publish import Aggregate, build_result
from hearthnet.fedlearn.state import ROUND_PREFIX, Phase, RoundRecord, fold_rounds
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn.coordinator")


def _now() -> datetime:
    return datetime.now(UTC)


class RoundCoordinator:
    def __init__(self, ctx: FedContext):
        self.ctx = ctx
        self.rounds: dict[str, RoundRecord] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.changed = ctx.changed

    # --- log ------------------------------------------------------------------------------------

    async def _emit(self, record: RoundRecord, suffix: str, payload: dict[str, Any]) -> None:
        """Check the transition, append the event, then apply it: the log leads, memory follows."""
        record.check(suffix)
        full = {"round_id": record.round_id, **payload}
        await self.ctx.eventlog.append(ROUND_PREFIX + suffix, full)
        record.apply(suffix, full)
        async with self.changed:
            self.changed.notify_all()

    def lock(self, round_id: str) -> asyncio.Lock:
        return self._locks.setdefault(round_id, asyncio.Lock())

    def get(self, round_id: str) -> RoundRecord:
        record = self.rounds.get(round_id)
        if record is None:
            raise HearthnetError(ErrorCode.BAD_REQUEST, f"no round {round_id} coordinated here")
        return record

    async def restore(self) -> None:
        """Rebuild every round from the log and carry on where each stopped."""
        self.rounds = fold_rounds(await self.ctx.eventlog.read_all(ROUND_PREFIX))
        for record in self.rounds.values():
            if record.phase is Phase.ANNOUNCED:
                self._arm(record)
            elif record.phase is Phase.AGGREGATING:
                self.ctx.spawn(self.finalize(record.round_id), f"finalize-{record.round_id}")
        if self.rounds:
            log.info("rounds restored", count=len(self.rounds))

    def _arm(self, record: RoundRecord) -> None:
        self.ctx.spawn(self._deadline(record.round_id), f"deadline-{record.round_id}")
        if record.signed.manifest.secure and record.roster is None:
            self.ctx.spawn(self._roster_timer(record.round_id), f"roster-{record.round_id}")

    async def _deadline(self, round_id: str) -> None:
        record = self.get(round_id)
        delay = (record.signed.manifest.deadline_at - _now()).total_seconds()
        await asyncio.sleep(max(0.0, delay))
        if record.phase is Phase.ANNOUNCED:
            with contextlib.suppress(HearthnetError):
                await self.finalize(round_id)

    # --- announce ---------------------------------------------------------------------------------

    async def announce_round(self, draft: RoundManifestDraft) -> SignedManifest:
        if len(self.rounds) >= C.FEDLEARN_MAX_ROUNDS:
            raise HearthnetError(ErrorCode.OVERLOADED, "too many rounds on this node")
        fed = self.ctx.config.fedlearn
        if fed.require_secure_aggregation and not draft.secure:
            raise HearthnetError(
                ErrorCode.MANIFEST_INVALID,
                "this node requires secure rounds ([fedlearn] require_secure_aggregation): "
                "announce with --secure",
            )
        signed = draft.build(self.ctx.identity, fed)
        if signed.manifest.base_model_sha != self.ctx.llm.base_model_sha:
            raise HearthnetError(
                ErrorCode.BASE_MODEL_MISMATCH, "a round must use this node's own base model"
            )
        record = RoundRecord(signed)
        await self.ctx.eventlog.append(
            ROUND_PREFIX + "announced",
            {"round_id": record.round_id, "manifest": signed.to_wire()},
        )
        self.rounds[record.round_id] = record
        self._arm(record)
        log.info("round announced", round_id=record.round_id, topic=signed.manifest.topic)
        return signed

    # --- join -------------------------------------------------------------------------------------

    async def enroll(self, caller: str, round_id: str, manifest_sha: str) -> SignedDoc:
        """The coordinator's half of join: admit `caller` and sign its receipt."""
        record = self.get(round_id)
        m = record.signed.manifest
        roster = self.ctx.config.trust.roster
        if roster and caller not in roster and caller != self.ctx.node_id:
            raise HearthnetError(ErrorCode.FORBIDDEN, "not a member of this community")
        if manifest_sha != record.signed.manifest_sha:
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "manifest rejected")
        score = self.ctx.reputation.score(caller)
        if caller != self.ctx.node_id:  # a node does not refuse itself
            if self.ctx.reputation.banned(caller):
                raise HearthnetError(
                    ErrorCode.REPUTATION_TOO_LOW,
                    f"reputation {score:.3f} is below this node's ban threshold",
                )
            if m.min_reputation is not None and score < m.min_reputation:
                raise HearthnetError(
                    ErrorCode.REPUTATION_TOO_LOW,
                    f"reputation {score:.3f} is below the round's min_reputation "
                    f"{m.min_reputation}",
                )
        async with self.lock(round_id):
            if caller in record.joined:
                return record.joined[caller]
            if record.phase is not Phase.ANNOUNCED or _now() >= m.deadline_at:
                raise HearthnetError(ErrorCode.ROUND_CLOSED, "the round is closed")
            if m.secure and record.roster is not None:
                raise HearthnetError(ErrorCode.ROUND_CLOSED, "the round's mask roster is closed")
            if len(record.joined) >= m.max_participants:
                raise HearthnetError(ErrorCode.ROUND_FULL, "the round is full")
            receipt = SignedDoc.sign(
                self.ctx.identity,
                JoinReceipt(
                    round_id=round_id,
                    manifest_sha=record.signed.manifest_sha,
                    participant=caller,
                    coordinator=self.ctx.node_id,
                    issued_at=format_ts(_now()),
                    reputation=round(score, 6),
                ),
            )
            await self._emit(
                record, "joined", {"participant": caller, "receipt": receipt.model_dump()}
            )
        log.info("participant joined", round_id=round_id, participant=caller)
        return receipt

    def check_receipt(self, record: RoundRecord, participant: str, receipt: SignedDoc) -> None:
        issued = receipt.open(JoinReceipt, self.ctx.node_id)
        if (
            issued.round_id != record.round_id
            or issued.participant != participant
            or issued.manifest_sha != record.signed.manifest_sha
            or participant not in record.joined
        ):
            raise HearthnetError(ErrorCode.FORBIDDEN, "no valid join receipt for this round")

    # --- secure rounds: mask keys -----------------------------------------------------------------

    async def accept_mask_key(self, caller: str, ann: MaskKeyAnnouncement) -> None:
        record = self.get(ann.round_id)
        m = record.signed.manifest
        if not m.secure:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "the round is not secure")
        if ann.participant != caller or caller not in record.joined:
            raise HearthnetError(ErrorCode.FORBIDDEN, "no valid join receipt for this round")
        ann.verify()
        if ann.manifest_sha != record.signed.manifest_sha:
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "mask key is for another round")
        async with self.lock(ann.round_id):
            if caller in record.masks:
                if record.masks[caller] != ann:
                    raise HearthnetError(ErrorCode.BAD_REQUEST, "a mask key was already announced")
                return
            if record.roster is not None or record.phase is not Phase.ANNOUNCED:
                raise HearthnetError(ErrorCode.ROUND_CLOSED, "the mask roster is closed")
            await self._emit(record, "mask_key", {"announcement": ann.model_dump()})
            await self._maybe_close_roster(record, timer=False)

    async def _maybe_close_roster(self, record: RoundRecord, timer: bool) -> None:
        m = record.signed.manifest
        n = len(record.masks)
        if record.roster is not None or n < m.min_participants:
            return
        if n < m.max_participants and not timer:
            return
        participants = sorted(record.masks)
        check_roster({p: record.masks[p] for p in participants}, m, record.signed.manifest_sha)
        await self._emit(record, "roster", {"participants": participants})
        log.info("mask roster closed", round_id=record.round_id, participants=n)

    async def _roster_timer(self, round_id: str) -> None:
        record = self.get(round_id)
        m = record.signed.manifest
        span = (m.deadline_at - m.created_at_dt).total_seconds()
        at = m.created_at_dt.timestamp() + span * C.FEDLEARN_SECURE_ROSTER_FRACTION
        await asyncio.sleep(max(0.0, at - _now().timestamp()))
        async with self.lock(round_id):
            if record.phase is Phase.ANNOUNCED:
                await self._maybe_close_roster(record, timer=True)

    # --- submissions ------------------------------------------------------------------------------

    async def _validate_submission(
        self, record: RoundRecord, sub: ParticipantSubmission, receipt: SignedDoc, data: bytes
    ) -> None:
        """Signature, receipt, deadline, size, structure and values — in that order."""
        m = record.signed.manifest
        sub.verify(data)
        self.check_receipt(record, sub.participant, receipt)
        if record.phase is not Phase.ANNOUNCED or _now() > m.deadline_at:
            raise HearthnetError(ErrorCode.ROUND_CLOSED, "submission after the deadline")
        if sub.participant in record.submissions:
            raise HearthnetError(ErrorCode.DELTA_INVALID, "participant already submitted")
        if sub.steps is not None and sub.steps > m.train_steps:
            raise HearthnetError(
                ErrorCode.DELTA_INVALID,
                f"{sub.steps} training steps claimed; the manifest asks for {m.train_steps}",
            )
        limit = self.ctx.config.fedlearn.submission_max_bytes
        if len(data) > limit:
            raise HearthnetError(ErrorCode.DELTA_INVALID, f"submission exceeds {limit} bytes")
        shapes = self.ctx.model_shapes()
        if m.secure:
            if record.roster is None or sub.participant not in record.roster:
                raise HearthnetError(ErrorCode.DELTA_INVALID, "not in the round's mask roster")
            if sub.num_samples != record.masks[sub.participant].num_samples:
                raise HearthnetError(
                    ErrorCode.DELTA_INVALID, "num_samples differs from the mask key"
                )
        # checked in memory: nothing is stored unless it is valid
        await asyncio.to_thread(check_payload, record.signed, sub.participant, data, shapes, limit)

    async def accept_submission(
        self, caller: str, sub: ParticipantSubmission, receipt: SignedDoc, data: bytes | None
    ) -> SubmitReceipt:
        record = self.get(sub.round_id)
        if data is None:
            raise HearthnetError(ErrorCode.DELTA_INVALID, "the delta must be sent as the blob")
        async with self.lock(sub.round_id):
            try:
                if sub.participant != caller:
                    raise HearthnetError(ErrorCode.FORBIDDEN, "a submission is the caller's own")
                await self._validate_submission(record, sub, receipt, data)
            except HearthnetError as err:
                log.warning(
                    "submission rejected",
                    round_id=record.round_id,
                    participant=caller,
                    code=str(err.code),
                    reason=err.message,
                )
                if caller in record.joined:
                    await self._emit(
                        record,
                        "rejected",
                        {"participant": caller, "code": str(err.code), "reason": err.message[:200]},
                    )
                raise
            sha = await asyncio.to_thread(self.ctx.blobs.put, data)
            await self._emit(
                record,
                "submitted",
                {"participant": caller, "submission": sub.model_dump(), "blob_sha": sha},
            )
        log.info("submission accepted", round_id=record.round_id, participant=caller)
        if self._all_in(record):
            self.ctx.spawn(self.finalize(record.round_id), f"finalize-{record.round_id}")
        return SubmitReceipt(
            round_id=record.round_id,
            participant=caller,
            delta_sha=sub.delta_sha,
            accepted_at=format_ts(_now()),
        )

    @staticmethod
    def _all_in(record: RoundRecord) -> bool:
        m = record.signed.manifest
        expected = (
            set(record.roster) if m.secure and record.roster is not None else set(record.joined)
        )
        return len(expected) >= m.min_participants and expected <= set(record.submissions)

    # --- aggregate and publish --------------------------------------------------------------------

    def _exclusions(self, record: RoundRecord, included: list[str]) -> list[Exclusion]:
        reasons = self._rejections(record)
        for p in record.joined:
            if p not in included:
                reasons.setdefault(p, "no valid submission before the deadline")
        return [Exclusion(participant=p, reason=r[:256]) for p, r in sorted(reasons.items())]

    async def _aggregate(self, record: RoundRecord) -> Aggregate:
        return await asyncio.to_thread(
            aggregate_submissions,
            record.signed,
            {p: s.submission for p, s in record.submissions.items()},
            self.ctx.blobs.path,
            self.ctx.model_shapes(),
            record.masks if record.signed.manifest.secure else None,
            receipt_influence(record.joined),
        )

    def _rejections(self, record: RoundRecord) -> dict[str, str]:
        out: dict[str, str] = {}
        for rejected in record.rejected:
            out.setdefault(rejected["participant"], f"{rejected['code']}: {rejected['reason']}")
        return out

    async def aggregate(self, round_id: str) -> bytes:
        """The adapter bytes from the round's valid submissions so far (spec §4.3)."""
        return (await self._aggregate(self.get(round_id))).adapter

    async def finalize(self, round_id: str) -> SignedDoc:
        """Close the round now: aggregate, publish (spec §4.3 finalize_and_publish), or abort."""
        record = self.get(round_id)
        async with self.lock(round_id):
            if record.phase is Phase.COMPLETED and record.result is not None:
                return record.result
            if record.phase is Phase.ABORTED:
                assert record.abort is not None
                raise HearthnetError(ErrorCode(record.abort["code"]), record.abort["reason"])
            if record.phase is Phase.ANNOUNCED:
                await self._emit(record, "aggregating", {})
            m = record.signed.manifest
            if len(record.submissions) < m.min_participants:
                reason = (
                    f"{len(record.submissions)} valid submissions; the round needs "
                    f"{m.min_participants}"
                )
                await self._emit(
                    record,
                    "aborted",
                    {"code": str(ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET), "reason": reason},
                )
                log.warning("round aborted", round_id=round_id, reason=reason)
                raise HearthnetError(ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET, reason)
            try:
                agg = await self._aggregate(record)
            except HearthnetError as err:
                code = (
                    err.code
                    if err.code is ErrorCode.FEDLEARN_AGGREGATION_FAILED
                    else ErrorCode.FEDLEARN_AGGREGATION_FAILED
                )
                await self._emit(
                    record, "aborted", {"code": str(code), "reason": err.message[:200]}
                )
                raise HearthnetError(code, err.message) from None
            sha = await asyncio.to_thread(self.ctx.blobs.put, agg.adapter)
            await self._emit(record, "aggregated", {"adapter_sha": sha})
            result = build_result(
                record.signed, agg, self.ctx.node_id, self._exclusions(record, agg.included), False
            )
            doc = SignedDoc.sign(self.ctx.identity, result)
            # before `completed`, so a finished round always has its reputation recorded (a
            # crash in between re-finalizes; a round is recorded once)
            await self.ctx.record_reputation(round_id, observations(agg, self._rejections(record)))
            await self._emit(record, "completed", {"result": doc.model_dump()})
        log.info(
            "round completed", round_id=round_id, adapter_sha=sha, participants=len(agg.included)
        )
        return doc
