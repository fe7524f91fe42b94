"""Taking in a round's signed result: the I/O around the participant machine's result checks.

The machine decides (`open_result`, `verify_result`, `recomputed`, `completed`); this module
gathers what they need — the signed submissions held here, a recomputation in a thread, the
adapter fetched from its aggregator and verified before it is stored, installed or served —
and installs the adapter once (docs/decisions.md, "Hostile peers").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hearthnet import constants as C
from hearthnet.canonical import sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event
from hearthnet.fedlearn.aggregation.run import aggregate_submissions, receipt_influence
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.drivers.coordinator import RoundCoordinator
from hearthnet.fedlearn.machines.effects import Append
from hearthnet.fedlearn.machines.participant import ParticipantMachine
from hearthnet.fedlearn.machines.results import Suspect
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.masks import MaskKeyAnnouncement
from hearthnet.fedlearn.peft_adapter import write_peft_adapter
from hearthnet.fedlearn.protocol import FetchResponse, RoundResult, SignedDoc
from hearthnet.fedlearn.publish import check_adapter, read_adapter
from hearthnet.fedlearn.state import TERMINAL_STAGES, Membership
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn.participant")

AppendTo = Callable[[ParticipantMachine, Append], Awaitable[Event]]


class ResultIntake:
    """Checks, fetches, stores and installs round results for the participant driver.
    `published` is the driver's set of adapter SHAs this node may serve (shared, not copied)."""

    def __init__(self, ctx: FedContext, coordinator: RoundCoordinator, published: set[str]):
        self.ctx = ctx
        self.coordinator = coordinator
        self.published = published

    async def _security_event(self, caller: str, what: str) -> None:
        await self.ctx.security.record("security.signature.invalid", caller, {"object": what})

    async def accept(
        self,
        machine: ParticipantMachine,
        doc: SignedDoc,
        sender: str,
        takeover_turn: bool,
        append: AppendTo,
    ) -> RoundResult:
        """The whole intake of one result; refusals raise (and are logged as security events
        when the sender sent something bad)."""
        member = machine.member
        try:
            result, new = machine.open_result(doc, sender, takeover_turn)
        except Suspect as err:
            await self._security_event(err.peer, err.what)
            raise
        if not new:
            return result
        try:
            await self._verify(machine, result)
        except HearthnetError as err:
            log.warning(
                "round result refused",
                round_id=member.round_id,
                sender=sender,
                aggregator=result.aggregator,
                code=str(err.code),
                reason=err.message,
            )
            await self._security_event(sender, "round result content")
            raise
        if member.stage in TERMINAL_STAGES:
            return result
        sha = result.aggregated_delta_sha
        blob = await self._adapter_blob(result)
        # Verified before it is stored, installed or servable: a result that names another
        # participant's delta, or an adapter of another round, stops here.
        try:
            await asyncio.to_thread(
                check_adapter, blob, member.signed, self.ctx.roster, self.ctx.model_shapes()
            )
        except HearthnetError:
            await self._security_event(sender, "round result adapter")
            raise
        await asyncio.to_thread(self.ctx.blobs.put, blob)
        await self.install_adapter(sha)
        self.published.add(sha)
        for eff in machine.completed(doc):
            await append(machine, eff)
        log.info(
            "round completed", round_id=member.round_id, adapter_sha=sha, takeover=result.takeover
        )
        if self.ctx.config.fedlearn.auto_apply_aggregated:
            self.ctx.llm.set_node_adapter(sha)
        return result

    async def _adapter_blob(self, result: RoundResult) -> bytes:
        sha = result.aggregated_delta_sha
        if self.ctx.blobs.has(sha):
            return await asyncio.to_thread(self.ctx.blobs.get, sha)
        peer = None if result.aggregator == self.ctx.node_id else result.aggregator
        _, blob = await self.ctx.bus.call_blob(
            C.FEDLEARN_CAP_PREFIX + "adapter.fetch",
            {"sha": sha},
            peer=peer,
            timeout=C.FEDLEARN_BLOB_CALL_TIMEOUT_S,
            response_model=FetchResponse,
        )
        if blob is None or sha256_hex(blob) != sha:
            raise HearthnetError(ErrorCode.PROTOCOL_ERROR, "fetched adapter does not match its SHA")
        return blob

    async def _verify(self, machine: ParticipantMachine, result: RoundResult) -> None:
        held, receipts, masks = self.held(machine.member)
        agg = machine.verify_result(result, held, receipts, masks, receipt_influence)
        if agg is None:
            return
        out = await asyncio.to_thread(
            aggregate_submissions,
            agg.signed,
            dict(agg.submissions),
            self.ctx.blobs.path,
            self.ctx.model_shapes(),
            agg.unmasked,
            dict(agg.influence),
        )
        machine.recomputed(result, sha256_hex(out.adapter))
        log.debug("result recomputed", round_id=machine.round_id, submissions=len(agg.submissions))

    def held(
        self, member: Membership
    ) -> tuple[
        dict[str, ParticipantSubmission], dict[str, SignedDoc], dict[str, MaskKeyAnnouncement]
    ]:
        """The signed submissions (with their blob here and their join receipt) this node holds
        for a round: its own, what its takeover was handed, and, on the coordinator, all."""
        subs: dict[str, ParticipantSubmission] = {}
        receipts: dict[str, SignedDoc] = {}
        masks: dict[str, MaskKeyAnnouncement] = dict(member.roster or {})

        def hold(p: str, sub: ParticipantSubmission, receipt: SignedDoc | None) -> None:
            if receipt is not None and self.ctx.blobs.has(sub.delta_sha):
                subs[p], receipts[p] = sub, receipt

        if member.submission is not None:
            hold(self.ctx.node_id, member.submission, member.receipt)
        for p, handed in member.handed.items():
            hold(p, handed.submission, member.handed_receipts.get(p))
        for ann in member.handed_masks.values():
            masks.setdefault(ann.participant, ann)
        record = self.coordinator.rounds.get(member.round_id)
        if record is not None:
            for p, s in record.submissions.items():
                hold(p, s.submission, record.joined.get(p))
            masks.update(record.masks)
        return subs, receipts, masks

    async def install_adapter(self, sha: str) -> SignedManifest:
        """Make a stored adapter blob usable by the LLM service (a PEFT directory); returns the
        manifest of the round that made it."""
        if not self.ctx.blobs.has(sha):
            raise HearthnetError(ErrorCode.ADAPTER_NOT_FOUND, f"no adapter {sha}")
        data = await asyncio.to_thread(self.ctx.blobs.get, sha)
        tensors, signed = read_adapter(data)
        target = self.ctx.llm.adapter_root / sha
        await asyncio.to_thread(
            write_peft_adapter, tensors, signed.manifest, signed.manifest.base_model_id, target
        )
        self.ctx.llm.register_adapter(sha, target)
        return signed
