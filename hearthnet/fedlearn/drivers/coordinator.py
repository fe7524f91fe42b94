"""Runs the coordinator machine (`machines/coordinator.py`) against the node: the log, blobs,
timers, threads for the blocking checks and the aggregation.

One lock per round: a machine step and the effects it returns run under it, so two callers
never decide on the same round state. Effects run in order; an `Append` is logged first and only
then folded into memory (the log leads).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from hearthnet import constants as C
from hearthnet.canonical import sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.run import aggregate_submissions, check_payload
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.events import Payload
from hearthnet.fedlearn.machines import effects as fx
from hearthnet.fedlearn.machines import finalize
from hearthnet.fedlearn.machines.coordinator import CoordinatorMachine
from hearthnet.fedlearn.manifest import RoundManifestDraft, SignedManifest, new_round_id
from hearthnet.fedlearn.masks import MaskKeyAnnouncement
from hearthnet.fedlearn.protocol import SignedDoc, SubmitReceipt
from hearthnet.fedlearn.publish import Aggregate
from hearthnet.fedlearn.shares import Reveal, ShareBundle
from hearthnet.fedlearn.state import ROUND_PREFIX, RoundRecord
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn.coordinator")


def _now() -> datetime:
    return datetime.now(UTC)


async def run_aggregate(ctx: FedContext, want: fx.Aggregate) -> Aggregate:
    """Carry out an `Aggregate` effect in a thread (the coordinator's and a taker's)."""
    return await asyncio.to_thread(
        aggregate_submissions,
        want.signed,
        want.submissions,
        lambda sha: ctx.blobs.path(want.blobs.get(sha, sha)),
        ctx.model_shapes(),
        want.unmasked,
        want.influence,
    )


def log_effect(effect: fx.Log) -> None:
    """Write a machine's `Log` effect to the operator log."""
    getattr(log, effect.level)(effect.event, **effect.fields)


class RoundCoordinator:
    """The coordinator role of a node: every round it announced, driven from its log."""

    def __init__(self, ctx: FedContext):
        self.ctx = ctx
        self.machine = CoordinatorMachine(ctx.identity, ctx.config)
        self._locks: dict[str, asyncio.Lock] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self.changed = ctx.changed

    @property
    def rounds(self) -> dict[str, RoundRecord]:
        """Every round this node coordinates (the machine's fold of the log)."""
        return self.machine.rounds

    def lock(self, round_id: str) -> asyncio.Lock:
        """The lock under which a round's steps run."""
        return self._locks.setdefault(round_id, asyncio.Lock())

    def get(self, round_id: str) -> RoundRecord:
        """The round, or `bad_request` if this node does not coordinate it."""
        return self.machine.get(round_id)

    # --- effects ----------------------------------------------------------------------------------

    async def _run(self, effects: list[fx.Effect]) -> None:
        for effect in effects:
            if isinstance(effect, fx.Append):
                await self._append(effect.type, effect.payload)
            elif isinstance(effect, fx.StoreBlob):
                await asyncio.to_thread(self.ctx.blobs.put, effect.data)
            elif isinstance(effect, fx.SetTimer):
                self._set_timer(effect)
            elif isinstance(effect, fx.Finalize):
                rid = effect.round_id
                self.ctx.spawn(self._finalize_quietly(rid), f"finalize-{rid}")
            elif isinstance(effect, fx.RecordReputation):
                await self.ctx.record_reputation(effect.round_id, effect.observed)
            elif isinstance(effect, fx.Log):
                log_effect(effect)
            else:
                raise TypeError(f"the coordinator does not run {effect!r}")

    async def _append(self, event_type: str, payload: Payload) -> None:
        suffix = event_type.removeprefix(ROUND_PREFIX)
        record = self.machine.rounds.get(payload.round_id)
        if record is not None:
            record.check(suffix)  # refuse a wrong transition before it reaches the log
        await self.ctx.eventlog.append(event_type, payload.body())
        follow = self.machine.apply(event_type, payload)
        async with self.changed:
            self.changed.notify_all()
        await self._run(follow)

    def _set_timer(self, timer: fx.SetTimer) -> None:
        old = self._timers.get(timer.name)
        if old is not None and not old.done():
            old.cancel()
        self._timers[timer.name] = self.ctx.spawn(self._fire(timer), timer.name)

    async def _fire(self, timer: fx.SetTimer) -> None:
        await asyncio.sleep(max(0.0, (timer.at - _now()).total_seconds()))
        round_id = timer.name.partition(":")[2]
        with contextlib.suppress(HearthnetError):
            async with self.lock(round_id):
                await self._run(self.machine.timer(timer.name, _now()))

    async def _finalize_quietly(self, round_id: str) -> None:
        with contextlib.suppress(HearthnetError):  # recorded as the round's abort
            await self.finalize(round_id)

    # --- the role's steps -------------------------------------------------------------------------

    async def restore(self) -> None:
        """Rebuild every round from the log and carry on where each stopped."""
        events = await self.ctx.eventlog.read_all(ROUND_PREFIX)
        await self._run(self.machine.restore(events))
        if self.rounds:
            log.info("rounds restored", count=len(self.rounds))

    async def announce_round(self, draft: RoundManifestDraft) -> SignedManifest:
        """Sign and record a new round; its timers start."""
        signed, effects = self.machine.announce(
            draft, self.ctx.llm.base_model_sha, _now(), new_round_id()
        )
        async with self.lock(signed.manifest.round_id):
            await self._run(effects)
        return signed

    async def enroll(self, caller: str, round_id: str, manifest_sha: str) -> SignedDoc:
        """The coordinator's half of join: admit `caller` and sign its receipt."""
        rep = self.ctx.reputation
        async with self.lock(round_id):
            receipt, effects = self.machine.enroll(
                caller, round_id, manifest_sha, _now(), rep.score(caller), rep.banned(caller)
            )
            await self._run(effects)
        return receipt

    async def accept_mask_key(self, caller: str, ann: MaskKeyAnnouncement) -> None:
        """A secure round's mask key; the roster closes when the round is full."""
        self.machine.get(ann.round_id)
        async with self.lock(ann.round_id):
            await self._run(self.machine.accept_mask_key(caller, ann))

    async def accept_submission(
        self, caller: str, sub: ParticipantSubmission, receipt: SignedDoc, data: bytes | None
    ) -> SubmitReceipt:
        """A signed submission with its delta: checked in memory, stored only if valid."""
        record = self.machine.get(sub.round_id)
        if data is None:
            raise HearthnetError(ErrorCode.DELTA_INVALID, "the delta must be sent as the blob")
        limit = self.ctx.config.fedlearn.submission_max_bytes
        async with self.lock(sub.round_id):
            try:
                self.machine.check_submission(caller, sub, receipt, data, _now())
                shapes = self.ctx.model_shapes()
                await asyncio.to_thread(
                    check_payload, record.signed, sub.participant, data, shapes, limit
                )
            except HearthnetError as err:
                await self._run(self.machine.reject(sub.round_id, caller, err))
                raise
            answer, effects = self.machine.submitted(sub, data, sha256_hex(data), _now())
            await self._run(effects)
        return answer

    async def accept_shares(self, caller: str, bundle: ShareBundle) -> None:
        """A secure round's share bundle; the share phase closes when every member sent one."""
        self.machine.get(bundle.round_id)
        async with self.lock(bundle.round_id):
            await self._run(self.machine.accept_shares(caller, bundle))

    async def accept_confirm(
        self, caller: str, round_id: str, unmask_sha: str, signature: str
    ) -> None:
        """A survivor's signature on the unmask request (logged once all are in)."""
        self.machine.get(round_id)
        async with self.lock(round_id):
            await self._run(self.machine.accept_confirm(caller, round_id, unmask_sha, signature))

    async def accept_reveal(self, caller: str, rev: Reveal) -> None:
        """A reveal for a secure round's unmask request, held in memory only."""
        self.machine.get(rev.round_id)
        async with self.lock(rev.round_id):
            self.machine.accept_reveal(caller, rev)
        async with self.changed:
            self.changed.notify_all()

    async def _await_reveals(self, round_id: str) -> None:
        """Wait up to FEDLEARN_SECURE_REVEAL_S for the reveals; abort the round without them."""
        async with self.changed:
            try:
                async with asyncio.timeout(C.FEDLEARN_SECURE_REVEAL_S):
                    await self.changed.wait_for(lambda: not self.machine.unmasking(round_id))
                return
            except TimeoutError:
                pass
        why = finalize.Abort(
            ErrorCode.FEDLEARN_AGGREGATION_FAILED,
            f"too few members revealed their shares within {C.FEDLEARN_SECURE_REVEAL_S:.0f} s",
        )
        async with self.lock(round_id):
            if self.machine.unmasking(round_id):
                await self._run(self.machine.abort(round_id, why))
        raise why.error()

    async def finalize(self, round_id: str) -> SignedDoc:
        """Close the round now: aggregate and publish, or abort (`finalize.plan`)."""
        self.machine.get(round_id)
        async with self.lock(round_id):
            done, effects = self.machine.close(round_id)
            if done is not None:
                return done
            await self._run(effects)
        if self.machine.unmasking(round_id):  # a secure round: wait for the reveals
            await self._await_reveals(round_id)
        async with self.lock(round_id):
            done, effects = self.machine.close(round_id)
            if done is not None:
                return done
            await self._run(effects)
            # a secure round's plan rebuilds secrets from shares (pure-Python Shamir, ~0.5 s at
            # n = 32): off the event loop, like the aggregation itself
            step = await asyncio.to_thread(self.machine.plan, round_id)
            if isinstance(step, finalize.Abort):
                await self._run(self.machine.abort(round_id, step))
                raise step.error()
            try:
                agg = await run_aggregate(self.ctx, step)
            except HearthnetError as err:
                failed = finalize.aggregation_failed(err)
                await self._run(self.machine.abort(round_id, failed))
                raise failed.error() from None
            doc, effects = self.machine.aggregated(round_id, agg, _now())
            await self._run(effects)
        return doc
