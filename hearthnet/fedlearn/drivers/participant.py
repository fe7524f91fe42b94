"""The participant's driver: runs `machines.participant.ParticipantMachine` against the node.

It owns everything with I/O — the event log, the bus, the blob store, the trainer (in a thread),
the subscription to the coordinator's events — and nothing of the protocol's decisions, which
are the machine's. The node's own participant events are mirrored in its log, so after a restart
`restore` folds them into fresh machines and each round continues with the same next step
(docs/architecture.md, "Federated rounds").
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event
from hearthnet.fedlearn import round_secrets
from hearthnet.fedlearn.budget import PrivacyPolicy, TopicLedger, fold_ledger
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.data import TrainingDataProvider
from hearthnet.fedlearn.delta import Delta
from hearthnet.fedlearn.drivers.coordinator import RoundCoordinator
from hearthnet.fedlearn.drivers.follow import follow
from hearthnet.fedlearn.drivers.results import ResultIntake
from hearthnet.fedlearn.drivers.work import call_with_retry, submission_bytes, train
from hearthnet.fedlearn.events import CONSENT_EVENT, MEMBER_PREFIX
from hearthnet.fedlearn.machines.effects import Append, Call, SetTimer
from hearthnet.fedlearn.machines.participant import (
    MakeShares,
    NewMaskKey,
    ParticipantMachine,
    Submit,
    Train,
    Wait,
    offer,
    offered_event,
)
from hearthnet.fedlearn.machines.results import Suspect
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.masks import MaskingKey
from hearthnet.fedlearn.protocol import (
    EnrollResponse,
    JoinResponse,
    RoundResult,
    SignedDoc,
    SubmitReceipt,
)
from hearthnet.fedlearn.requirements import check_base_model, check_resources
from hearthnet.fedlearn.secagg import make_bundle
from hearthnet.fedlearn.state import TERMINAL_STAGES, Membership, Stage, fold_memberships
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn.participant")

_SUFFIX = {CONSENT_EVENT: "consent"}


def _now() -> datetime:
    return datetime.now(UTC)


class ParticipantDriver:
    """Offers, consent and join, the per-round driver (train, mask, submit, follow) and
    results, for every round this node was offered. `members` is the folded state by round."""

    def __init__(
        self, ctx: FedContext, coordinator: RoundCoordinator, provider: TrainingDataProvider
    ):
        self.ctx = ctx
        self.coordinator = coordinator
        self.provider = provider
        self.members: dict[str, Membership] = {}
        self.machines: dict[str, ParticipantMachine] = {}
        self.published: set[str] = set()  # adapter SHAs this node may serve
        self.results = ResultIntake(ctx, coordinator, self.published)
        self.changed = ctx.changed
        self._train_lock = asyncio.Lock()
        self._drivers: dict[str, asyncio.Task[Any]] = {}
        self._cancel = threading.Event()
        # secure rounds: trained tensors by delta SHA, kept in memory until masked (not across
        # a restart: then the stored delta is read back)
        self._trained: dict[str, Delta] = {}

    # --- log and state -------------------------------------------------------------------------

    def _machine_for(self, member: Membership) -> ParticipantMachine:
        machine = ParticipantMachine(
            self.ctx.identity, member, set(self.ctx.config.trust.roster), self.privacy_policy()
        )
        self.members[member.round_id] = member
        self.machines[member.round_id] = machine
        return machine

    def privacy_policy(self) -> PrivacyPolicy:
        """The node's `[fedlearn]` privacy settings."""
        f = self.ctx.config.fedlearn
        return PrivacyPolicy(f.dp_delta, f.dp_epsilon_budget, f.require_dp)

    def ledger(self) -> dict[str, TopicLedger]:
        """The privacy ledger: every round this node joined (a fold of its own log), by topic."""
        joined = [(rid, m.signed.manifest) for rid, m in self.members.items() if m.receipt]
        return fold_ledger(joined)

    async def _append(self, machine: ParticipantMachine, eff: Append) -> Event:
        """The log leads: store the event, then feed the stored record to the machine."""
        event = await self.ctx.eventlog.append(eff.type, eff.payload.body())
        suffix = _SUFFIX.get(eff.type, eff.type.removeprefix(MEMBER_PREFIX))
        machine.apply(suffix, type(eff.payload).model_validate(event.payload))
        await self._notify()
        return event

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def get(self, round_id: str) -> Membership:
        """The membership of a round this node was offered; `bad_request` if unknown."""
        return self.machine(round_id).member

    def machine(self, round_id: str) -> ParticipantMachine:
        """The machine of a round this node was offered; `bad_request` if unknown."""
        machine = self.machines.get(round_id)
        if machine is None:
            raise HearthnetError(ErrorCode.BAD_REQUEST, f"round {round_id} is unknown here")
        return machine

    async def restore(self) -> None:
        """Fold the log into fresh machines and resume every round still under way."""
        self._cancel = threading.Event()
        self._drivers.clear()
        self.members, self.machines = {}, {}
        for member in fold_memberships(await self.ctx.eventlog.read_all("fedlearn.")).values():
            self._machine_for(member)
            if member.result is not None:
                self.published.add(member.result.claimed(RoundResult).aggregated_delta_sha)
            if member.stage in (Stage.JOINED, Stage.TRAINED, Stage.SUBMITTED):
                await self._unseal(self.machines[member.round_id])
                self._start(member)
            else:
                round_secrets.discard(self.ctx.config.data_dir, member.round_id)
        for record in self.coordinator.rounds.values():
            if record.adapter_sha is not None:
                self.published.add(record.adapter_sha)

    async def _unseal(self, machine: ParticipantMachine) -> None:
        """A secure round's sealed secrets, back into its machine after a restart."""
        if not machine.signed.manifest.secure:
            return
        try:
            key = await asyncio.to_thread(
                round_secrets.unseal,
                self.ctx.config.data_dir,
                self.ctx.identity,
                machine.round_id,
                machine.signed.manifest_sha,
            )
        except HearthnetError as err:  # this round fails here (no secrets); the node starts
            log.warning("round secrets unusable", round_id=machine.round_id, reason=err.message)
            return
        if key is not None:
            machine.keyed(key)

    def stop(self) -> None:
        """Ask a running training to stop at its next step."""
        self._cancel.set()

    async def _security_event(self, caller: str, what: str) -> None:
        await self.ctx.security.record("security.signature.invalid", caller, {"object": what})

    # --- offers and consent --------------------------------------------------------------------

    async def offered(self, caller: str, wire: dict[str, Any]) -> str:
        """A coordinator offers a round: kept (logged) until the operator consents."""
        try:
            signed = offer(wire, caller, self.ctx.roster)
        except Suspect as err:
            await self._security_event(err.peer, err.what)
            raise
        round_id = signed.manifest.round_id
        if round_id in self.members:
            return round_id
        if len(self.members) >= C.FEDLEARN_MAX_ROUNDS:
            raise HearthnetError(ErrorCode.OVERLOADED, "too many rounds offered")
        eff = offered_event(signed)
        await self.ctx.eventlog.append(eff.type, eff.payload.body())
        self._machine_for(Membership(signed))
        log.info(
            "round offered: awaiting operator consent",
            round_id=round_id,
            topic=signed.manifest.topic,
            coordinator=caller,
        )
        return round_id

    async def join(self, round_id: str, consent: bool) -> JoinResponse:
        """In order: consent, the manifest's signature, base model, resources, then enroll."""
        machine = self.machine(round_id)
        member = machine.member
        m = member.signed.manifest
        consent_seq = 0
        for eff in machine.consent(consent):
            consent_seq = (await self._append(machine, eff)).seq
        if member.receipt is not None:
            return JoinResponse(
                round_id=round_id, receipt=member.receipt, consent_event_seq=consent_seq
            )
        try:
            call = machine.enroll(self.ctx.roster, self.ledger())
        except Suspect as err:
            await self._security_event(err.peer, err.what)
            raise
        check_base_model(m, self.ctx.llm)
        check_resources(m, self.ctx.llm, self.ctx.config.fedlearn)
        samples = await asyncio.to_thread(self.provider.samples, m.topic)
        response = await self.ctx.bus.call(
            call.capability,
            call.body,
            peer=self._peer(call.peer),
            timeout=C.FEDLEARN_PEER_CALL_TIMEOUT_S,
            response_model=EnrollResponse,
        )
        for eff in machine.enrolled(response, len(samples)):
            await self._append(machine, eff)
        log.info("joined round", round_id=round_id, samples=len(samples))
        self._start(member)
        return JoinResponse(
            round_id=round_id, receipt=response.receipt, consent_event_seq=consent_seq
        )

    def _peer(self, node: str) -> str | None:
        return None if node == self.ctx.node_id else node

    # --- the per-round driver: run the machine's next step until the round ends here ----------

    def _start(self, member: Membership) -> None:
        task = self._drivers.get(member.round_id)
        if task is not None and not task.done():
            return
        self._drivers[member.round_id] = self.ctx.spawn(
            self._drive(self.machines[member.round_id]), f"participant-{member.round_id}"
        )

    def _companions(self, member: Membership) -> dict[str, Coroutine[Any, Any, None]]:
        """Tasks that run beside a round's driver, by name (the follower; a subclass adds)."""
        return {f"follow-{member.round_id}": self._follow(member)}

    async def _drive(self, machine: ParticipantMachine) -> None:
        member = machine.member
        tasks = [self.ctx.spawn(c, n) for n, c in self._companions(member).items()]
        try:
            while member.stage not in TERMINAL_STAGES:
                effects = machine.next()
                if not effects:
                    await self._until(lambda: member.stage in TERMINAL_STAGES)
                    break
                for eff in effects:
                    await self._run(machine, eff)
        except HearthnetError as err:
            if isinstance(err, Suspect):
                await self._security_event(err.peer, err.what)
            await self._failed(machine, err)
        except Exception as exc:  # a bug or the machine's trouble (disk, model): say so here
            log.exception("round step crashed", round_id=member.round_id)
            await self._failed(machine, HearthnetError(ErrorCode.INTERNAL_ERROR, repr(exc)))
        finally:
            for task in tasks:
                task.cancel()
            if member.stage in TERMINAL_STAGES:
                round_secrets.discard(self.ctx.config.data_dir, member.round_id)

    async def _failed(self, machine: ParticipantMachine, err: HearthnetError) -> None:
        """The round failed on this node: logged and recorded, so `fedlearn status` shows why."""
        member = machine.member
        if member.stage in TERMINAL_STAGES:
            return
        log.warning(
            "round failed here", round_id=member.round_id, code=str(err.code), reason=err.message
        )
        for eff in machine.failed(err):
            await self._append(machine, eff)

    async def _run(self, machine: ParticipantMachine, eff: Any) -> None:
        if isinstance(eff, Train):
            outcome, tensors = await train(
                self.ctx, self.provider, self._train_lock, self._cancel, machine.member
            )
            if machine.signed.manifest.secure:
                self._trained[outcome.blob_sha] = tensors
            for out in machine.trained(outcome):
                await self._append(machine, out)
        elif isinstance(eff, NewMaskKey):
            key = MaskingKey()
            signed = machine.signed
            await asyncio.to_thread(
                round_secrets.seal,
                self.ctx.config.data_dir,
                self.ctx.identity,
                machine.round_id,
                signed.manifest_sha,
                key,
            )
            machine.keyed(key)
        elif isinstance(eff, MakeShares):
            assert machine.key is not None
            bundle = await asyncio.to_thread(make_bundle, self.ctx.identity, machine.key, eff.plan)
            for out in machine.shares_made(bundle):
                await self._append(machine, out)
        elif isinstance(eff, Wait):
            await self._until(machine.settled)
        elif isinstance(eff, Call):
            reply, _ = await call_with_retry(self.ctx, eff, C.FEDLEARN_PEER_CALL_TIMEOUT_S)
            for out in machine.reply(eff.name, reply):
                await self._append(machine, out)
        elif isinstance(eff, SetTimer):
            left = (eff.at - _now()).total_seconds()
            if not await self._until(machine.settled, timeout=max(0.0, left)):
                machine.timer(eff.name, _now())
        elif isinstance(eff, Submit):
            await self._submit(machine, eff)
        elif isinstance(eff, Append):
            await self._append(machine, eff)
        else:  # an effect nobody carries out would be a silent protocol hole
            raise TypeError(f"the participant does not run {eff!r}")

    async def _until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        async with self.changed:
            try:
                async with asyncio.timeout(timeout):
                    await self.changed.wait_for(done)
            except TimeoutError:
                return False
        return True

    def _seconds_left(self, member: Membership) -> float:
        return (member.signed.manifest.deadline_at - _now()).total_seconds()

    async def _submit(self, machine: ParticipantMachine, eff: Submit) -> None:
        trained = self._trained.get(eff.trained_sha)
        data = await submission_bytes(self.ctx, machine.signed, eff, trained)
        if eff.key is None:
            sha = eff.trained_sha  # the stored delta itself: already in the blob store
        else:
            sha = await asyncio.to_thread(self.ctx.blobs.put, data)
            self._trained.pop(eff.trained_sha, None)
        call = machine.submission(data, sha)
        raw, _ = await call_with_retry(
            self.ctx, call, C.FEDLEARN_BLOB_CALL_TIMEOUT_S, SubmitReceipt
        )
        for out in machine.reply(call.name, raw):
            await self._append(machine, out)
        log.info("submitted", round_id=machine.round_id, delta_sha=raw.delta_sha[:16])

    # --- following the coordinator and taking in results ---------------------------------------

    async def _follow(self, member: Membership) -> None:
        """Mirror the coordinator's round events until the round ends here."""
        await follow(self.ctx, member, lambda event: self._observe(member, event))

    async def _observe(self, member: Membership, event: Event) -> None:
        machine = self.machines[member.round_id]
        refused = machine.refused
        try:
            effects = machine.observe(event.seq, event.type, event.payload)
        finally:
            if machine.refused is not None and refused is None:
                reason = machine.refused.message
                log.warning("mask roster refused", round_id=member.round_id, reason=reason)
        for eff in effects:
            if isinstance(eff, SignedDoc):
                await self.accept_result(eff, member.signed.manifest.coordinator)
            elif isinstance(eff, Append):
                await self._append(machine, eff)
        await self._notify()

    def _takeover_turn(self, member: Membership, claimed: RoundResult) -> bool:
        """Whether a takeover result may count now (the taker's rule; no takeover here)."""
        return False

    async def accept_result(self, doc: SignedDoc, sender: str) -> RoundResult:
        """A round's signed result: from its coordinator, or a takeover by one of its members.
        Checked, its adapter fetched, verified and stored, installed once."""
        claimed = doc.claimed(RoundResult)
        machine = self.machine(claimed.round_id)
        coordinator = machine.signed.manifest.coordinator
        turn = claimed.aggregator != coordinator and self._takeover_turn(machine.member, claimed)
        return await self.results.accept(machine, doc, sender, turn, self._append)

    async def install_adapter(self, sha: str) -> SignedManifest:
        """Make a stored adapter blob usable by the LLM service (a PEFT directory); returns the
        manifest of the round that made it."""
        return await self.results.install_adapter(sha)
