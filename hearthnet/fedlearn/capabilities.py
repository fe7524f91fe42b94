"""`experimental.fedlearn.*` on the capability bus (spec M28 §4.2) and the module's wiring.

Registered only when `[experimental] fedlearn = true`; with the flag off the bus answers
`experimental_disabled` for every name here, read-only ones included. Operator actions
(announce, join, finalize, takeover, apply, pending) are local-only: they come through the
node's control socket, never from a peer. Peer-facing ones take the caller from the
authenticated session.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from hearthnet import constants as C
from hearthnet.bus.bus import CallContext, CapabilityBus
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event
from hearthnet.fedlearn import evaluation
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.coordinator import RoundCoordinator
from hearthnet.fedlearn.data import CustomFileProvider, TrainingDataProvider, held_out_salt
from hearthnet.fedlearn.manifest import RoundManifestDraft, SignedManifest
from hearthnet.fedlearn.participant import CAP, RoundParticipant
from hearthnet.fedlearn.protocol import (
    AnnounceRequest,
    AnnounceResponse,
    ApplyReceipt,
    ApplyRequest,
    Empty,
    EnrollRequest,
    EnrollResponse,
    EvaluateRequest,
    EvaluationReport,
    FetchRequest,
    FetchResponse,
    HandoverResponse,
    JoinRequest,
    JoinResponse,
    ListRequest,
    ListResponse,
    MaskKeyRequest,
    OfferRequest,
    PendingResponse,
    ReputationResponse,
    ReputationRow,
    ResultPush,
    RoundRef,
    RoundStatus,
    RoundSummary,
    SignedDoc,
    StatusRequest,
    SubmitReceipt,
    SubmitRequest,
    _Msg,
)
from hearthnet.fedlearn.state import TERMINAL_PHASES, TERMINAL_STAGES, Phase, Stage
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn")


# What an announce may leave out (besides topic and consent_text, which an operator must write).
DRAFT_DEFAULTS: dict[str, Any] = {
    "lora_target_modules": ["q_proj", "v_proj"],
    "lora_rank": 8,
    "train_steps": 50,
    "learning_rate": 1e-3,
    "batch_size": 4,
    "deadline_in_s": 3600,
}


class HandoverRequest(_Msg):
    round_id: str
    receipt: SignedDoc


class Ack(_Msg):
    ok: bool = True


def _num(value: float | None, digits: int = 2) -> str:
    return "not finite" if value is None else f"{value:.{digits}f}"


class FedLearnService:
    """The fedlearn module of one node: a coordinator, a participant, and their capabilities."""

    def __init__(self, ctx: FedContext, provider: TrainingDataProvider | None = None):
        self.ctx = ctx
        root = ctx.config.fedlearn.training_data or ctx.config.data_dir / C.TRAINING_DIR_NAME
        self.coordinator = RoundCoordinator(ctx)
        self._offered_at: dict[str, float] = {}  # peer -> when it was last offered open rounds
        self.participant = RoundParticipant(
            ctx,
            self.coordinator,
            provider
            or CustomFileProvider(
                root,
                self._render_chat,
                ctx.config.fedlearn.held_out_fraction,
                held_out_salt(ctx.config.data_dir),
            ),
        )

    def _render_chat(self, messages: list[dict[str, str]]) -> str:
        tokenizer = self.ctx.llm.tokenizer
        if tokenizer is None:
            raise HearthnetError(
                ErrorCode.MODEL_UNAVAILABLE,
                "chat data (messages lines) is rendered with the model's tokenizer: set "
                "[llm] enabled = true, or give the topic's text as .txt or text lines",
            )
        return str(tokenizer.apply_chat_template(messages, tokenize=False))

    async def start(self) -> None:
        await self.ctx.load_reputation()
        await self.coordinator.restore()
        await self.participant.restore()

    async def stop(self) -> None:
        self.participant.stop()
        tasks = list(self.ctx.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def published(self, sha: str) -> bool:
        """Adapters of completed rounds; never a participant's delta, though both are blobs."""
        return sha in self.participant.published or any(
            r.adapter_sha == sha for r in self.coordinator.rounds.values()
        )

    def event_visible(self, peer: str, event: Event) -> bool:
        """A round's events are visible to the peers that joined it."""
        record = self.coordinator.rounds.get(str(event.payload.get("round_id")))
        return record is not None and peer in record.joined

    # --- views ------------------------------------------------------------------------------------

    def _summaries(self, topic: str | None, local: bool) -> list[RoundSummary]:
        out: dict[str, RoundSummary] = {}
        for rid, member in self.participant.members.items():
            if local:
                out[rid] = self._summary(member.signed, member.coordinator_phase, "participant")
        for rid, record in self.coordinator.rounds.items():
            if local or record.phase is Phase.ANNOUNCED:
                out[rid] = self._summary(record.signed, str(record.phase), "coordinator")
        return [s for _, s in sorted(out.items()) if topic is None or s.topic == topic]

    @staticmethod
    def _summary(signed: Any, phase: str, role: str) -> RoundSummary:
        m = signed.manifest
        return RoundSummary(
            round_id=m.round_id,
            topic=m.topic,
            coordinator=m.coordinator,
            deadline=m.deadline,
            phase=phase,
            role=role,
            manifest=m.to_json() | {"manifest_sha": signed.manifest_sha},
        )

    def status(self, round_id: str) -> RoundStatus:
        record = self.coordinator.rounds.get(round_id)
        member = self.participant.members.get(round_id)
        if record is None and member is None:
            raise HearthnetError(ErrorCode.BAD_REQUEST, f"round {round_id} is unknown here")
        if record is not None:
            return RoundStatus(
                round_id=round_id,
                phase=str(record.phase),
                role="coordinator",
                stage=str(member.stage) if member else None,
                coordinator=self.ctx.node_id,
                deadline=record.signed.manifest.deadline,
                joined=sorted(record.joined),
                submitted=sorted(record.submissions),
                rejected=record.rejected,
                result=record.result,
                abort=record.abort,
                train_steps=record.signed.manifest.train_steps,
                steps={p: s.submission.steps for p, s in sorted(record.submissions.items())},
            )
        assert member is not None
        phase = {Stage.COMPLETED: "completed", Stage.ABORTED: "aborted"}.get(
            member.stage, member.coordinator_phase
        )
        return RoundStatus(
            round_id=round_id,
            phase=phase,
            role="participant",
            stage=str(member.stage),
            coordinator=member.signed.manifest.coordinator,
            deadline=member.signed.manifest.deadline,
            joined=sorted(member.participants),
            submitted=[],
            rejected=[],
            result=member.result,
            abort=member.abort,
            train_steps=member.signed.manifest.train_steps,
            steps={} if member.steps is None else {self.ctx.node_id: member.steps},
        )

    def _finished(self, round_id: str) -> bool:
        record = self.coordinator.rounds.get(round_id)
        member = self.participant.members.get(round_id)
        if member is not None and member.stage in TERMINAL_STAGES:
            return True
        return (
            record is not None
            and record.phase in TERMINAL_PHASES
            and (member is None or member.stage in (Stage.OFFERED, Stage.CONSENTED))
        )

    # --- registration -----------------------------------------------------------------------------

    def register(self, bus: CapabilityBus) -> None:
        def reg(
            name: str, handler: Any, req: type, resp: type, local_only: bool, what: str
        ) -> None:
            bus.register(CAP + name, handler, req, resp, local_only=local_only, description=what)

        reg(
            "round.announce",
            self._announce,
            AnnounceRequest,
            AnnounceResponse,
            True,
            "operator: announce a round from a draft",
        )
        reg(
            "round.offer",
            self._offer,
            OfferRequest,
            RoundRef,
            False,
            "a coordinator offers a signed round",
        )
        reg(
            "round.list",
            self._list,
            ListRequest,
            ListResponse,
            False,
            "rounds known here (peers: open rounds coordinated here)",
        )
        reg(
            "round.pending",
            self._pending,
            Empty,
            PendingResponse,
            True,
            "operator: rounds awaiting consent",
        )
        reg(
            "round.join",
            self._join,
            JoinRequest,
            JoinResponse,
            True,
            "operator: consent to and join a round",
        )
        reg(
            "round.enroll",
            self._enroll,
            EnrollRequest,
            EnrollResponse,
            False,
            "coordinator: admit the caller, sign its receipt",
        )
        reg(
            "round.mask_key",
            self._mask_key,
            MaskKeyRequest,
            Ack,
            False,
            "coordinator: a secure round's mask key",
        )
        reg(
            "round.submit",
            self._submit,
            SubmitRequest,
            SubmitReceipt,
            False,
            "coordinator: a signed submission (delta as blob)",
        )
        reg(
            "round.status",
            self._status,
            StatusRequest,
            RoundStatus,
            True,
            "operator: a round's state (optionally wait for its end)",
        )
        reg(
            "round.finalize",
            self._finalize,
            RoundRef,
            ResultPush,
            True,
            "operator: close a round now (coordinator only)",
        )
        reg(
            "round.finalize_takeover",
            self._takeover,
            RoundRef,
            ResultPush,
            True,
            "operator: take over a round whose coordinator is gone",
        )
        reg(
            "round.handover",
            self._handover,
            HandoverRequest,
            HandoverResponse,
            False,
            "a participant's submission, for a takeover",
        )
        reg(
            "round.result", self._result, ResultPush, Ack, False, "a signed round result (takeover)"
        )
        reg(
            "reputation",
            self._reputation,
            Empty,
            ReputationResponse,
            True,
            "operator: participants' reputation as this node sees it",
        )
        reg(
            "adapter.fetch",
            self._fetch,
            FetchRequest,
            FetchResponse,
            False,
            "a published adapter by SHA (blob)",
        )
        reg(
            "adapter.evaluate",
            self._evaluate,
            EvaluateRequest,
            EvaluationReport,
            True,
            "operator: an adapter's held-out perplexity on this node's own text",
        )
        reg(
            "adapter.apply",
            self._apply,
            ApplyRequest,
            ApplyReceipt,
            True,
            "operator: apply an adapter to a session or the node",
        )

    # --- handlers ---------------------------------------------------------------------------------

    async def _announce(self, _ctx: CallContext, req: AnnounceRequest) -> AnnounceResponse:
        fields = dict(req.draft)
        llm = self.ctx.llm
        fed = self.ctx.config.fedlearn
        defaults = {
            **DRAFT_DEFAULTS,
            "base_model_id": llm.base_model_id,
            "base_model_sha": llm.base_model_sha,
            "seed": secrets.randbelow(2**31),
            "min_participants": fed.min_round_participants,
            "max_participants": fed.max_round_participants,
        }
        fields = {**defaults, **fields}
        if "lora_alpha" not in req.draft and isinstance(fields["lora_rank"], int):
            fields["lora_alpha"] = 2 * fields["lora_rank"]
        seconds = fields.pop("deadline_in_s")
        if "deadline" not in fields:
            if not isinstance(seconds, int | float) or not 0 < seconds <= C.FEDLEARN_MAX_DEADLINE_S:
                raise HearthnetError(
                    ErrorCode.MANIFEST_INVALID,
                    f"deadline_in_s is out of range: more than 0, at most "
                    f"{C.FEDLEARN_MAX_DEADLINE_S // 86400} days (--deadline-in)",
                )
            fields["deadline"] = datetime.now(UTC) + timedelta(seconds=float(seconds))
        draft = RoundManifestDraft.from_fields(fields)
        signed = await self.coordinator.announce_round(draft)
        await self.participant.offered(self.ctx.node_id, signed.to_wire())
        offered = [p for p in self.ctx.connected_peers() if await self._offer_to(p, signed)]
        return AnnounceResponse(
            round_id=signed.round_id, manifest_sha=signed.manifest_sha, offered_to=offered
        )

    async def _offer_to(self, peer: str, signed: SignedManifest) -> bool:
        try:
            await self.ctx.bus.call(
                CAP + "round.offer",
                {"manifest": signed.to_wire()},
                peer=peer,
                timeout=C.FEDLEARN_PEER_CALL_TIMEOUT_S,
            )
        except HearthnetError as err:
            log.info("offer not taken", peer=peer, round_id=signed.round_id, code=str(err.code))
            return False
        return True

    def peer_connected(self, peer: str) -> None:
        """A peer that connects while a round is open is offered it then (an announce reaches
        only the peers connected at that moment). Only rounds a peer could still join: open,
        before the deadline, not full, a secure round's mask roster not yet closed."""
        now = datetime.now(UTC)
        joinable = [
            r.signed
            for r in self.coordinator.rounds.values()
            if r.phase is Phase.ANNOUNCED
            and r.signed.manifest.deadline_at > now
            and peer not in r.joined
            and len(r.joined) < r.signed.manifest.max_participants
            and r.roster is None
        ]
        if not joinable:
            return
        # Reconnecting does not buy a peer more offers than one per cooldown.
        clock = time.monotonic()
        if clock - self._offered_at.get(peer, -math.inf) < C.FEDLEARN_REOFFER_COOLDOWN_S:
            return
        self._offered_at.pop(peer, None)
        self._offered_at[peer] = clock
        while len(self._offered_at) > C.FEDLEARN_REOFFER_MEMORY:
            del self._offered_at[next(iter(self._offered_at))]  # the oldest
        self.ctx.spawn(self._offer_open(peer, joinable), f"offer-{peer[:12]}")

    async def _offer_open(self, peer: str, rounds: list[SignedManifest]) -> None:
        for signed in rounds:
            if await self._offer_to(peer, signed):
                log.info("open round offered to a peer that connected", round_id=signed.round_id)

    async def _offer(self, ctx: CallContext, req: OfferRequest) -> RoundRef:
        round_id = await self.participant.offered(ctx.caller, req.manifest.model_dump())
        return RoundRef(round_id=round_id)

    async def _list(self, ctx: CallContext, req: ListRequest) -> ListResponse:
        return ListResponse(rounds=self._summaries(req.topic, ctx.local))

    async def _pending(self, _ctx: CallContext, _req: Empty) -> PendingResponse:
        waiting = [
            self._summary(m.signed, m.coordinator_phase, "participant")
            for m in self.participant.members.values()
            if m.stage is Stage.OFFERED and m.signed.manifest.deadline_at > datetime.now(UTC)
        ]
        return PendingResponse(rounds=sorted(waiting, key=lambda s: s.round_id))

    async def _reputation(self, _ctx: CallContext, _req: Empty) -> ReputationResponse:
        table = self.ctx.reputation
        rows = [ReputationRow(**row) for row in table.rows()]
        return ReputationResponse(ban_threshold=table.ban_below, participants=rows)

    async def _join(self, _ctx: CallContext, req: JoinRequest) -> JoinResponse:
        return await self.participant.join(req.round_id, req.consent)

    async def _enroll(self, ctx: CallContext, req: EnrollRequest) -> EnrollResponse:
        receipt = await self.coordinator.enroll(ctx.caller, req.round_id, req.manifest_sha)
        return EnrollResponse(receipt=receipt)

    async def _mask_key(self, ctx: CallContext, req: MaskKeyRequest) -> Ack:
        await self.coordinator.accept_mask_key(ctx.caller, req.announcement)
        return Ack()

    async def _submit(self, ctx: CallContext, req: SubmitRequest) -> SubmitReceipt:
        return await self.coordinator.accept_submission(
            ctx.caller, req.submission, req.receipt, ctx.blob
        )

    async def _status(self, _ctx: CallContext, req: StatusRequest) -> RoundStatus:
        if req.wait:
            changed = self.ctx.changed
            async with changed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(req.timeout_s):
                        await changed.wait_for(lambda: self._finished(req.round_id))
        return self.status(req.round_id)

    async def _finalize(self, _ctx: CallContext, req: RoundRef) -> ResultPush:
        if req.round_id in self.coordinator.rounds:
            return ResultPush(result=await self.coordinator.finalize(req.round_id))
        member = self.participant.get(req.round_id)
        if member.result is not None:
            return ResultPush(result=member.result)
        if self.ctx.connected(member.signed.manifest.coordinator):
            raise HearthnetError(ErrorCode.FORBIDDEN, "only the round's coordinator finalizes it")
        raise HearthnetError(
            ErrorCode.FEDLEARN_AGGREGATOR_UNREACHABLE,
            "the coordinator is offline and no takeover ran; see `fedlearn takeover`",
        )

    async def _takeover(self, _ctx: CallContext, req: RoundRef) -> ResultPush:
        return ResultPush(result=await self.participant.takeover(req.round_id))

    async def _handover(
        self, ctx: CallContext, req: HandoverRequest
    ) -> tuple[HandoverResponse, bytes]:
        return await self.participant.handover(ctx.caller, req.round_id, req.receipt)

    async def _result(self, ctx: CallContext, req: ResultPush) -> Ack:
        await self.participant.accept_result(req.result, ctx.caller)
        return Ack()

    async def _fetch(self, _ctx: CallContext, req: FetchRequest) -> tuple[FetchResponse, bytes]:
        # Only published adapters: participants' deltas share the blob store and are never served.
        if not self.published(req.sha) or not self.ctx.blobs.has(req.sha):
            raise HearthnetError(ErrorCode.ADAPTER_NOT_FOUND, f"no adapter {req.sha}")
        data = await asyncio.to_thread(self.ctx.blobs.get, req.sha)
        return FetchResponse(sha=req.sha, size=len(data)), data

    async def _judge(self, sha: str, purpose: str, force: bool) -> EvaluationReport | None:
        """Judge a published adapter on this node's held-out text and log the judgement; None
        (also logged) when `force` lets an apply go ahead without one."""
        if not self.published(sha):
            raise HearthnetError(ErrorCode.ADAPTER_NOT_FOUND, f"no adapter {sha}")
        m = (await self.participant.install_adapter(sha)).manifest
        provider = self.participant.provider
        try:
            held = await asyncio.to_thread(provider.held_out, m.topic)
            if not held:
                where = str(getattr(provider, "root", "the training data folder"))
                raise evaluation.no_held_out_text(m.topic, where, purpose == "apply")
            verdict = await evaluation.judge(
                self.ctx.llm,
                self.ctx.eventlog,
                sha,
                m,
                held,
                self.ctx.config.fedlearn.apply_max_perplexity_ratio,
                purpose=purpose,
                forced=force,
            )
        except HearthnetError as err:
            if not force:
                raise
            await evaluation.record_unjudged(self.ctx.eventlog, sha, m, purpose, err)
            log.warning("adapter applied unjudged", sha=sha, reason=err.message)
            return None
        if not verdict.passes and not force:
            raise HearthnetError(
                ErrorCode.ADAPTER_REJECTED,
                f"the adapter makes this node's held-out text worse: perplexity "
                f"{_num(verdict.perplexity_base)} -> {_num(verdict.perplexity_adapter)} on "
                f"{verdict.texts} texts of topic {m.topic!r} (ratio {_num(verdict.ratio, 3)}, "
                f"allowed {verdict.max_ratio}); raise [fedlearn] apply_max_perplexity_ratio or "
                "pass --force to apply it anyway",
                verdict.model_dump(),
            )
        return verdict

    async def _evaluate(self, _ctx: CallContext, req: EvaluateRequest) -> EvaluationReport:
        report = await self._judge(req.sha, "evaluate", force=False)
        assert report is not None  # without force, a failure raises
        return report

    async def _apply(self, _ctx: CallContext, req: ApplyRequest) -> ApplyReceipt:
        if not self.published(req.sha):
            raise HearthnetError(ErrorCode.ADAPTER_NOT_FOUND, f"no adapter {req.sha}")
        llm = self.ctx.llm
        if req.scope == "node":
            report = await self._judge(req.sha, "apply", req.force)
            llm.set_node_adapter(req.sha)
            log.info("node adapter set", sha=req.sha, forced=req.force, judged=report is not None)
            return ApplyReceipt(
                sha=req.sha,
                scope="node",
                session_id=None,
                node_default=req.sha,
                evaluation=report,
                forced=req.force,
            )
        await self.participant.install_adapter(req.sha)
        session = llm.open_session(req.sha)
        return ApplyReceipt(
            sha=req.sha, scope="session", session_id=session.id, node_default=llm.node_default
        )
