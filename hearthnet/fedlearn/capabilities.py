"""`experimental.fedlearn.*` on the capability bus, and the module's wiring.

Registered only when `[experimental] fedlearn = true`; with the flag off the bus answers
`experimental_disabled` for every name here, read-only ones included. What each capability is
(models, who may call it) is the table in `capability_table.py`; this service binds each row to
its handler. Operator actions (announce, join, finalize, takeover, apply, pending) are local-only:
they come through the node's control socket, never from a peer. Peer-facing ones take the caller
from the authenticated session. The views are `views.py`; judging and applying an adapter,
`adapter_use.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from datetime import UTC, datetime

from hearthnet import constants as C
from hearthnet.bus.bus import CallContext, CapabilityBus
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event
from hearthnet.fedlearn import views
from hearthnet.fedlearn.adapter_use import AdapterUse
from hearthnet.fedlearn.capability_table import CAP, CAPABILITIES
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.data import CustomFileProvider, TrainingDataProvider, held_out_salt
from hearthnet.fedlearn.drivers.coordinator import RoundCoordinator
from hearthnet.fedlearn.manifest import RoundManifestDraft, SignedManifest
from hearthnet.fedlearn.participant import RoundParticipant
from hearthnet.fedlearn.protocol import (
    Ack,
    AnnounceRequest,
    AnnounceResponse,
    ApplyReceipt,
    ApplyRequest,
    ConfirmRequest,
    Empty,
    EnrollRequest,
    EnrollResponse,
    EvaluateRequest,
    EvaluationReport,
    FetchRequest,
    FetchResponse,
    HandoverRequest,
    HandoverResponse,
    JoinRequest,
    JoinResponse,
    ListRequest,
    ListResponse,
    MaskKeyRequest,
    OfferRequest,
    PendingResponse,
    PrivacyResponse,
    ReputationResponse,
    ReputationRow,
    ResultPush,
    RevealRequest,
    RoundRef,
    RoundStatus,
    SharesRequest,
    StatusRequest,
    SubmitReceipt,
    SubmitRequest,
)
from hearthnet.fedlearn.state import Phase
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn")


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
        self.adapters = AdapterUse(ctx, self.participant, self.published)

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
        """Rebuild reputation, rounds and memberships from the log."""
        await self.ctx.load_reputation()
        await self.coordinator.restore()
        await self.participant.restore()

    async def stop(self) -> None:
        """Stop training and cancel the module's background tasks."""
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

    def status(self, round_id: str) -> RoundStatus:
        """A round's state as this node knows it (`views.status`)."""
        return views.status(
            self.ctx.node_id, self.coordinator.rounds, self.participant.members, round_id
        )

    def register(self, bus: CapabilityBus) -> None:
        """Every row of `CAPABILITIES`, answered by the method it names."""
        for cap in CAPABILITIES:
            handler = getattr(self, cap.handler)
            bus.register(
                cap.full_name,
                handler,
                cap.request,
                cap.response,
                local_only=cap.local_only,
                description=cap.description,
            )

    # --- handlers ---------------------------------------------------------------------------------

    async def _round_announce(self, _ctx: CallContext, req: AnnounceRequest) -> AnnounceResponse:
        llm = self.ctx.llm
        draft = RoundManifestDraft.from_request(
            req.draft, self.ctx.config.fedlearn, llm.base_model_id, llm.base_model_sha
        )
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

    async def _round_offer(self, ctx: CallContext, req: OfferRequest) -> RoundRef:
        round_id = await self.participant.offered(ctx.caller, req.manifest.model_dump())
        return RoundRef(round_id=round_id)

    async def _round_list(self, ctx: CallContext, req: ListRequest) -> ListResponse:
        return ListResponse(
            rounds=views.summaries(
                self.coordinator.rounds, self.participant.members, req.topic, ctx.local
            )
        )

    async def _round_pending(self, _ctx: CallContext, _req: Empty) -> PendingResponse:
        return PendingResponse(rounds=views.pending(self.participant.members))

    async def _privacy(self, _ctx: CallContext, _req: Empty) -> PrivacyResponse:
        ledger = self.participant.ledger()
        return views.privacy(self.participant.members, ledger, self.participant.privacy_policy())

    async def _reputation(self, _ctx: CallContext, _req: Empty) -> ReputationResponse:
        table = self.ctx.reputation
        rows = [ReputationRow(**row) for row in table.rows()]
        return ReputationResponse(ban_threshold=table.ban_below, participants=rows)

    async def _round_join(self, _ctx: CallContext, req: JoinRequest) -> JoinResponse:
        return await self.participant.join(req.round_id, req.consent)

    async def _round_enroll(self, ctx: CallContext, req: EnrollRequest) -> EnrollResponse:
        receipt = await self.coordinator.enroll(ctx.caller, req.round_id, req.manifest_sha)
        return EnrollResponse(receipt=receipt)

    async def _round_mask_key(self, ctx: CallContext, req: MaskKeyRequest) -> Ack:
        await self.coordinator.accept_mask_key(ctx.caller, req.announcement)
        return Ack()

    async def _round_shares(self, ctx: CallContext, req: SharesRequest) -> Ack:
        await self.coordinator.accept_shares(ctx.caller, req.bundle)
        return Ack()

    async def _round_confirm(self, ctx: CallContext, req: ConfirmRequest) -> Ack:
        await self.coordinator.accept_confirm(
            ctx.caller, req.round_id, req.unmask_sha, req.signature
        )
        return Ack()

    async def _round_reveal(self, ctx: CallContext, req: RevealRequest) -> Ack:
        await self.coordinator.accept_reveal(ctx.caller, req.reveal)
        return Ack()

    async def _round_submit(self, ctx: CallContext, req: SubmitRequest) -> SubmitReceipt:
        return await self.coordinator.accept_submission(
            ctx.caller, req.submission, req.receipt, ctx.blob
        )

    async def _round_status(self, _ctx: CallContext, req: StatusRequest) -> RoundStatus:
        if req.wait:
            changed = self.ctx.changed
            async with changed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(req.timeout_s):
                        await changed.wait_for(
                            lambda: views.finished(
                                self.coordinator.rounds, self.participant.members, req.round_id
                            )
                        )
        return self.status(req.round_id)

    async def _round_finalize(self, _ctx: CallContext, req: RoundRef) -> ResultPush:
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

    async def _round_finalize_takeover(self, _ctx: CallContext, req: RoundRef) -> ResultPush:
        return ResultPush(result=await self.participant.takeover(req.round_id))

    async def _round_handover(
        self, ctx: CallContext, req: HandoverRequest
    ) -> tuple[HandoverResponse, bytes]:
        return await self.participant.handover(ctx.caller, req.round_id, req.receipt)

    async def _round_result(self, ctx: CallContext, req: ResultPush) -> Ack:
        await self.participant.accept_result(req.result, ctx.caller)
        return Ack()

    async def _adapter_fetch(
        self, _ctx: CallContext, req: FetchRequest
    ) -> tuple[FetchResponse, bytes]:
        # Only published adapters: participants' deltas share the blob store and are never served.
        if not self.published(req.sha) or not self.ctx.blobs.has(req.sha):
            raise HearthnetError(ErrorCode.ADAPTER_NOT_FOUND, f"no adapter {req.sha}")
        data = await asyncio.to_thread(self.ctx.blobs.get, req.sha)
        return FetchResponse(sha=req.sha, size=len(data)), data

    async def _adapter_evaluate(self, _ctx: CallContext, req: EvaluateRequest) -> EvaluationReport:
        return await self.adapters.evaluate(req.sha)

    async def _adapter_apply(self, _ctx: CallContext, req: ApplyRequest) -> ApplyReceipt:
        return await self.adapters.apply(req)
