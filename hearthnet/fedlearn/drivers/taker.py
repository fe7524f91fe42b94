"""Runs the taker machine (`machines/taker.py`): the takeover watch of each round this node
takes part in, the handover answer it gives another taker, and the takeover itself (handover
calls, the shared finalize, publishing)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Protocol

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.drivers.coordinator import log_effect, run_aggregate
from hearthnet.fedlearn.machines import effects as fx
from hearthnet.fedlearn.machines import finalize
from hearthnet.fedlearn.machines.taker import TakerMachine, check_handed
from hearthnet.fedlearn.protocol import HandoverResponse, RoundResult, SignedDoc
from hearthnet.fedlearn.state import Membership
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn.taker")


def _now() -> datetime:
    return datetime.now(UTC)


class Participant(Protocol):
    """What the taker needs of the participant role."""

    published: set[str]

    def get(self, round_id: str) -> Membership:
        """This node's membership of a round."""

    async def accept_result(self, doc: SignedDoc, sender: str) -> RoundResult:
        """Check and install a signed result as the participant would on receiving it."""


class TakeoverDriver:
    """The takeover side of a participant: a second finalize when the coordinator is gone."""

    def __init__(self, ctx: FedContext, participant: Participant):
        self.ctx = ctx
        self.participant = participant
        self.machine = TakerMachine(ctx.identity, ctx.config)

    def _coordinator_up(self, member: Membership) -> bool:
        return self.ctx.connected(member.signed.manifest.coordinator)

    def takeover_turn(self, member: Membership, claimed: RoundResult) -> bool:
        """Whether a takeover result may count now (`TakerMachine.takeover_turn`)."""
        return self.machine.takeover_turn(member, claimed, _now(), self._coordinator_up(member))

    async def watch(self, member: Membership) -> None:
        """Wait for this node's turn, then take over once, unless the round ended."""
        timers = self.machine.watch(member)
        while timers:
            effect = timers.pop()
            if isinstance(effect, fx.Finalize):
                try:
                    await self.takeover(member.round_id)
                except HearthnetError as err:
                    log.warning(
                        "takeover failed",
                        round_id=member.round_id,
                        code=str(err.code),
                        reason=err.message,
                    )
                return
            assert isinstance(effect, fx.SetTimer)
            await asyncio.sleep(max(0.0, (effect.at - _now()).total_seconds()))
            up = self._coordinator_up(member)
            timers = self.machine.timer(effect.name, member, _now(), up)

    async def handover(
        self, caller: str, round_id: str, receipt: SignedDoc
    ) -> tuple[HandoverResponse, bytes]:
        """This node's own submission, for the member taking the round over."""
        member = self.participant.get(round_id)
        answer, sha = self.machine.handover(
            member, caller, receipt, _now(), self._coordinator_up(member)
        )
        return answer, await asyncio.to_thread(self.ctx.blobs.get, sha)

    async def takeover(self, round_id: str) -> SignedDoc:
        """Gather the submissions this node can reach and finalize them as the coordinator
        would, signing as this node (`takeover=True`)."""
        member = self.participant.get(round_id)
        done, g, calls = self.machine.begin(member, _now(), self._coordinator_up(member))
        if done is not None:
            return done
        assert g is not None
        shapes = self.ctx.model_shapes()
        limit = self.ctx.config.fedlearn.submission_max_bytes
        for call in calls:
            assert isinstance(call, fx.Call)
            try:
                resp, data = await self.ctx.bus.call_blob(
                    call.capability,
                    call.body,
                    peer=call.peer,
                    timeout=C.FEDLEARN_BLOB_CALL_TIMEOUT_S,
                    response_model=HandoverResponse,
                )
                if data is None:
                    raise HearthnetError(ErrorCode.PROTOCOL_ERROR, "handover without its delta")
                await asyncio.to_thread(check_handed, member, resp, data, call.peer, shapes, limit)
            except HearthnetError as err:
                self.machine.refused(g, call.peer, err)
                continue
            sha = await asyncio.to_thread(self.ctx.blobs.put, data)
            self.machine.handed(g, member, call.peer, resp, sha)
        step = self.machine.plan(member, g)
        if isinstance(step, finalize.Abort):
            raise step.error()
        agg = await run_aggregate(self.ctx, step)
        doc, effects = self.machine.publish(member, g, agg, _now())
        accepted = False
        for effect in effects:
            if isinstance(effect, fx.StoreBlob):
                self.participant.published.add(
                    await asyncio.to_thread(self.ctx.blobs.put, effect.data)
                )
            elif isinstance(effect, fx.RecordReputation):
                await self.ctx.record_reputation(effect.round_id, effect.observed)
            elif isinstance(effect, fx.Call):
                if not accepted:
                    await self.participant.accept_result(doc, self.ctx.node_id)
                    accepted = True
                with contextlib.suppress(HearthnetError):
                    await self.ctx.bus.call(
                        effect.capability,
                        effect.body,
                        peer=effect.peer,
                        timeout=C.FEDLEARN_PEER_CALL_TIMEOUT_S,
                    )
            elif isinstance(effect, fx.Log):
                log_effect(effect)
        if not accepted:
            await self.participant.accept_result(doc, self.ctx.node_id)
        return doc
