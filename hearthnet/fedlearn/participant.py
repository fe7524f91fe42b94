"""The participant side of a round (spec M28 §4.4, §5.3–5.7): offers, consent, join, training,
submission, following the coordinator, adapters, and coordinator takeover.

The participant mirrors its own stage in its log (`fedlearn.participant.*`, and the signed
`fedlearn.consent.granted`), so after a restart it picks up where it stopped: a joined round is
trained, a trained delta submitted, a submitted round followed to its result.

Takeover (spec §5.7): once the deadline plus a grace period has passed and the coordinator is
unreachable, the round's participants take over in a deterministic preference order
(SHA-256 of round id and NodeID), each waiting a stagger longer than the one before, so normally
one node does it. The taker gathers the other participants' signed submissions and receipts,
aggregates them with the same code as a coordinator, and publishes a result signed by itself and
marked `takeover`. A participant hands its submission over only after the deadline, while it
cannot reach the coordinator itself, and only to a node holding a valid receipt for the round.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from datetime import UTC, datetime
from typing import Any

from hearthnet import constants as C
from hearthnet.canonical import sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event
from hearthnet.fedlearn.aggregation.run import (
    aggregate_submissions,
    check_payload,
    observations,
    receipt_influence,
)
from hearthnet.fedlearn.aggregation.secure import mask_delta, serialize_masked
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.coordinator import RoundCoordinator
from hearthnet.fedlearn.data import TrainingDataProvider
from hearthnet.fedlearn.delta import deserialize_delta, serialize_delta
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.masks import MaskingKey, MaskKeyAnnouncement, check_roster
from hearthnet.fedlearn.peft_adapter import write_peft_adapter
from hearthnet.fedlearn.protocol import (
    EnrollResponse,
    Exclusion,
    FetchResponse,
    HandoverResponse,
    JoinReceipt,
    JoinResponse,
    RoundResult,
    SignedDoc,
    SubmitReceipt,
)
from hearthnet.fedlearn.publish import build_result, check_adapter, read_adapter
from hearthnet.fedlearn.requirements import check_base_model, check_resources
from hearthnet.fedlearn.state import (
    CONSENT_EVENT,
    MEMBER_PREFIX,
    ROUND_PREFIX,
    TERMINAL_STAGES,
    Membership,
    Stage,
    Submitted,
    fold_memberships,
)
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.fedlearn.verify import check_listing, check_recomputed, held_for_recompute
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn.participant")

CAP = "experimental.fedlearn."
_RETRY_S = 1.0


def _now() -> datetime:
    return datetime.now(UTC)


def preference(round_id: str, participants: set[str]) -> list[str]:
    """The order in which participants take over a round: the same on every node."""
    return sorted(participants, key=lambda p: hashlib.sha256(f"{round_id}\0{p}".encode()).digest())


class RoundParticipant:
    def __init__(
        self, ctx: FedContext, coordinator: RoundCoordinator, provider: TrainingDataProvider
    ):
        self.ctx = ctx
        self.coordinator = coordinator
        self.provider = provider
        self.members: dict[str, Membership] = {}
        self.published: set[str] = set()  # adapter SHAs this node may serve
        # secure rounds whose mask roster this node refused (keys it will not mask with)
        self._refused_rosters: dict[str, HearthnetError] = {}
        self.changed = ctx.changed
        self._mask_keys: dict[str, MaskingKey] = {}  # memory only, never logged or persisted
        self._anns: dict[str, dict[str, MaskKeyAnnouncement]] = {}
        self._train_lock = asyncio.Lock()
        self._drivers: dict[str, asyncio.Task[Any]] = {}
        self._cancel = threading.Event()

    # --- log ------------------------------------------------------------------------------------

    async def _emit(self, member: Membership, suffix: str, payload: dict[str, Any]) -> Event:
        member.check(suffix)
        full = {"round_id": member.round_id, **payload}
        event_type = CONSENT_EVENT if suffix == "consent" else MEMBER_PREFIX + suffix
        event = await self.ctx.eventlog.append(event_type, full)
        member.apply(suffix, full)
        async with self.changed:
            self.changed.notify_all()
        return event

    def get(self, round_id: str) -> Membership:
        member = self.members.get(round_id)
        if member is None:
            raise HearthnetError(ErrorCode.BAD_REQUEST, f"round {round_id} is unknown here")
        return member

    async def restore(self) -> None:
        self._cancel = threading.Event()
        self._drivers.clear()
        events = await self.ctx.eventlog.read_all("fedlearn.")
        self.members = fold_memberships(events)
        for member in self.members.values():
            if member.result is not None:
                self.published.add(member.result.claimed(RoundResult).aggregated_delta_sha)
            if member.stage in (Stage.JOINED, Stage.TRAINED, Stage.SUBMITTED):
                self._start(member)
        for record in self.coordinator.rounds.values():
            if record.adapter_sha is not None:
                self.published.add(record.adapter_sha)

    def stop(self) -> None:
        self._cancel.set()

    async def _security_event(self, caller: str, what: str) -> None:
        await self.ctx.security.record("security.signature.invalid", caller, {"object": what})

    # --- offers and consent -----------------------------------------------------------------------

    async def offered(self, caller: str, wire: dict[str, Any]) -> str:
        try:
            signed = SignedManifest.from_wire(wire, self.ctx.roster)
            if signed.manifest.coordinator != caller:
                raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "manifest rejected")
        except HearthnetError:
            await self._security_event(caller, "manifest")
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "manifest rejected") from None
        round_id = signed.manifest.round_id
        if round_id in self.members:
            return round_id
        if len(self.members) >= C.FEDLEARN_MAX_ROUNDS:
            raise HearthnetError(ErrorCode.OVERLOADED, "too many rounds offered")
        member = Membership(signed)
        await self.ctx.eventlog.append(
            MEMBER_PREFIX + "offered", {"round_id": round_id, "manifest": signed.to_wire()}
        )
        self.members[round_id] = member
        log.info(
            "round offered: awaiting operator consent",
            round_id=round_id,
            topic=signed.manifest.topic,
            coordinator=caller,
        )
        return round_id

    async def join(self, round_id: str, consent: bool) -> JoinResponse:
        """Spec §5.3, in order: (flag: the bus), consent, signature, base model, resources."""
        member = self.get(round_id)
        m = member.signed.manifest
        consent_seq = 0
        if member.stage is Stage.OFFERED:
            if not consent:
                raise HearthnetError(
                    ErrorCode.CONSENT_REQUIRED,
                    "the operator has not accepted this round's consent text",
                )
            event = await self._emit(
                member,
                "consent",
                {
                    "manifest_sha": member.signed.manifest_sha,
                    "consent_text_sha": sha256_hex(m.consent_text.encode("utf-8")),
                },
            )
            consent_seq = event.seq
        if member.receipt is not None:
            return JoinResponse(
                round_id=round_id, receipt=member.receipt, consent_event_seq=consent_seq
            )
        try:
            member.signed.verify(self.ctx.roster)
        except HearthnetError:
            await self._security_event(m.coordinator, "manifest")
            raise
        check_base_model(m, self.ctx.llm)
        check_resources(m, self.ctx.llm, self.ctx.config.fedlearn)
        samples = await asyncio.to_thread(self.provider.samples, m.topic)
        response = await self.ctx.bus.call(
            CAP + "round.enroll",
            {"round_id": round_id, "manifest_sha": member.signed.manifest_sha},
            peer=self._peer(m.coordinator),
            timeout=C.FEDLEARN_PEER_CALL_TIMEOUT_S,
            response_model=EnrollResponse,
        )
        receipt = response.receipt
        issued = receipt.open(JoinReceipt, m.coordinator)
        if issued.participant != self.ctx.node_id or issued.round_id != round_id:
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "receipt rejected")
        await self._emit(
            member, "joined", {"receipt": receipt.model_dump(), "num_samples": len(samples)}
        )
        log.info("joined round", round_id=round_id, samples=len(samples))
        self._start(member)
        return JoinResponse(round_id=round_id, receipt=receipt, consent_event_seq=consent_seq)

    def _peer(self, node: str) -> str | None:
        return None if node == self.ctx.node_id else node

    # --- the driver: train, (mask,) submit, follow ------------------------------------------------

    def _start(self, member: Membership) -> None:
        if member.round_id in self._drivers and not self._drivers[member.round_id].done():
            return
        self._drivers[member.round_id] = self.ctx.spawn(
            self._drive(member), f"participant-{member.round_id}"
        )

    async def _drive(self, member: Membership) -> None:
        follower = self.ctx.spawn(self._follow(member), f"follow-{member.round_id}")
        watcher = self.ctx.spawn(self._watch_takeover(member), f"takeover-{member.round_id}")
        try:
            if member.stage is Stage.JOINED:
                await self._train(member)
            if member.signed.manifest.secure and member.stage is Stage.TRAINED:
                await self._announce_mask_key(member)
            if member.stage is Stage.TRAINED:
                await self._submit(member)
            await self._until(lambda: member.stage in TERMINAL_STAGES)
        except HearthnetError as err:
            if member.stage not in TERMINAL_STAGES:
                log.warning(
                    "round failed here",
                    round_id=member.round_id,
                    code=str(err.code),
                    reason=err.message,
                )
                await self._emit(
                    member, "aborted", {"code": str(err.code), "reason": err.message[:200]}
                )
        finally:
            follower.cancel()
            watcher.cancel()

    async def _until(self, done: Any, timeout: float | None = None) -> bool:
        async with self.changed:
            try:
                async with asyncio.timeout(timeout):
                    await self.changed.wait_for(done)
            except TimeoutError:
                return False
        return True

    def _seconds_left(self, member: Membership) -> float:
        return (member.signed.manifest.deadline_at - _now()).total_seconds()

    async def _train(self, member: Membership) -> None:
        m = member.signed.manifest
        from hearthnet.fedlearn.trainer import QLoRATrainer

        async with self._train_lock:
            samples = await asyncio.to_thread(self.provider.samples, m.topic)
            # off the loop: on a node that never loaded the model this converts a GGUF (~25 s)
            model_dir = await asyncio.to_thread(lambda: self.ctx.llm.model_dir)
            trainer = QLoRATrainer(model_dir, self.ctx.llm.device)
            log.info(
                "training", round_id=member.round_id, samples=len(samples), steps=m.train_steps
            )
            result = await asyncio.to_thread(trainer.train, m, samples, cancel=self._cancel)
        data = serialize_delta(
            result.delta,
            manifest_sha=member.signed.manifest_sha,
            round_id=member.round_id,
            participant=self.ctx.node_id,
        )
        sha = await asyncio.to_thread(self.ctx.blobs.put, data)
        await self._emit(
            member,
            "trained",
            {
                "blob_sha": sha,
                "num_samples": result.num_samples,
                "train_loss": result.train_loss,
                "steps": result.steps,
                "train_steps": m.train_steps,
                "stopped_early": result.stopped_early,
            },
        )
        log.info(
            "trained",
            round_id=member.round_id,
            loss=round(result.train_loss, 4),
            steps=result.steps,
            of=m.train_steps,
            stopped_early=result.stopped_early,
        )

    async def _call_coordinator(
        self, member: Membership, name: str, body: dict[str, Any], **kw: Any
    ) -> Any:
        """Call the coordinator, retrying while it is unreachable, until the deadline."""
        coordinator = member.signed.manifest.coordinator
        while True:
            try:
                return await self.ctx.bus.call_blob(name, body, peer=self._peer(coordinator), **kw)
            except HearthnetError as err:
                if err.code not in (ErrorCode.PEER_NOT_CONNECTED, ErrorCode.TIMEOUT):
                    raise
                if self._seconds_left(member) <= 0:
                    raise HearthnetError(
                        ErrorCode.FEDLEARN_AGGREGATOR_UNREACHABLE,
                        "the coordinator was unreachable until the deadline",
                    ) from None
            await asyncio.sleep(_RETRY_S)

    async def _announce_mask_key(self, member: Membership) -> None:
        assert member.num_samples is not None
        key = self._mask_keys.get(member.round_id)
        if key is None:
            if member.roster is not None:
                raise HearthnetError(
                    ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                    "this node's mask key was lost (restart) after the roster closed",
                )
            key = self._mask_keys[member.round_id] = MaskingKey()
        ann = key.announce(
            self.ctx.identity, member.round_id, member.signed.manifest_sha, member.num_samples
        )
        await self._call_coordinator(
            member,
            CAP + "round.mask_key",
            {"announcement": ann.model_dump()},
            timeout=C.FEDLEARN_PEER_CALL_TIMEOUT_S,
        )
        left = max(0.0, self._seconds_left(member))
        refused = self._refused_rosters

        def settled() -> bool:
            return member.roster is not None or member.round_id in refused

        if not await self._until(settled, timeout=left):
            raise HearthnetError(
                ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET, "the mask roster never closed"
            )
        if member.round_id in refused:
            raise refused[member.round_id]

    async def _submission_bytes(self, member: Membership) -> bytes:
        assert member.trained_sha is not None
        data = await asyncio.to_thread(self.ctx.blobs.get, member.trained_sha)
        if not member.signed.manifest.secure:
            return data
        roster = member.roster
        assert roster is not None
        key = self._mask_keys[member.round_id]
        signed = member.signed
        shapes = self.ctx.model_shapes()

        def masked() -> bytes:  # parsing and masking up to 64 MiB: off the event loop
            delta, _ = deserialize_delta(data)
            vec = mask_delta(
                delta, key, self.ctx.node_id, roster, signed.manifest, signed.manifest_sha, shapes
            )
            return serialize_masked(
                vec,
                manifest_sha=signed.manifest_sha,
                round_id=signed.manifest.round_id,
                participant=self.ctx.node_id,
            )

        return await asyncio.to_thread(masked)

    async def _submit(self, member: Membership) -> None:
        assert member.receipt is not None and member.num_samples is not None
        data = await self._submission_bytes(member)
        sha = await asyncio.to_thread(self.ctx.blobs.put, data)
        sub = ParticipantSubmission.create(
            self.ctx.identity,
            member.round_id,
            data,
            member.num_samples,
            member.train_loss or 0.0,
            steps=member.steps,
        )
        raw, _ = await self._call_coordinator(
            member,
            CAP + "round.submit",
            {"submission": sub.model_dump(), "receipt": member.receipt.model_dump()},
            timeout=C.FEDLEARN_BLOB_CALL_TIMEOUT_S,
            blob=data,
            response_model=SubmitReceipt,
        )
        await self._emit(member, "submitted", {"submission": sub.model_dump(), "blob_sha": sha})
        log.info("submitted", round_id=member.round_id, delta_sha=raw.delta_sha[:16])

    # --- following the coordinator ----------------------------------------------------------------

    async def _follow(self, member: Membership) -> None:
        """Mirror the coordinator's round events until the round ends here."""
        coordinator = member.signed.manifest.coordinator
        while member.stage not in TERMINAL_STAGES:
            try:
                if coordinator == self.ctx.node_id:
                    await self._follow_local(member)
                else:
                    await self.ctx.transport.wait_for_peer(
                        coordinator, C.FEDLEARN_PEER_CALL_TIMEOUT_S
                    )
                    sub = await self.ctx.transport.subscribe(
                        coordinator, ROUND_PREFIX, member.seen_seq
                    )
                    try:
                        async for event in sub:
                            await self._observe(member, event)
                            if member.stage in TERMINAL_STAGES:
                                break
                    finally:
                        await sub.close()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bad event or a lost peer: pause, resubscribe
                log.info("following paused", round_id=member.round_id, reason=str(err)[:200])
            await asyncio.sleep(_RETRY_S)

    async def _follow_local(self, member: Membership) -> None:
        sub = self.ctx.eventlog.subscribe(ROUND_PREFIX)
        try:
            for event in await self.ctx.eventlog.read_all(ROUND_PREFIX):
                await self._observe(member, event)
            async for event in sub:
                await self._observe(member, event)
                if member.stage in TERMINAL_STAGES:
                    return
        finally:
            sub.close()

    async def _observe(self, member: Membership, event: Event) -> None:
        payload = event.payload
        if event.seq <= member.seen_seq or payload.get("round_id") != member.round_id:
            return
        member.seen_seq = event.seq
        suffix = event.type.removeprefix(ROUND_PREFIX)
        if suffix == "joined":
            member.participants.add(str(payload["participant"]))
        elif suffix == "mask_key":
            ann = MaskKeyAnnouncement.model_validate(payload["announcement"])
            self._anns.setdefault(member.round_id, {})[ann.participant] = ann
        elif suffix == "roster":
            anns = self._anns.get(member.round_id, {})
            roster = {p: anns[p] for p in payload["participants"] if p in anns}
            check_roster(roster, member.signed.manifest, member.signed.manifest_sha)
            if len(roster) != len(payload["participants"]):
                raise HearthnetError(ErrorCode.PROTOCOL_ERROR, "roster names unknown mask keys")
            try:
                self._check_mask_holders(member, set(roster))
            except HearthnetError as err:  # keep following (the result may still come)
                self._refused_rosters[member.round_id] = err
                log.warning("mask roster refused", round_id=member.round_id, reason=err.message)
            else:
                member.roster = roster
        elif suffix == "completed":
            await self.accept_result(
                SignedDoc.model_validate(payload["result"]), member.signed.manifest.coordinator
            )
        elif suffix == "aborted" and member.stage not in TERMINAL_STAGES:
            await self._emit(
                member, "aborted", {"code": payload["code"], "reason": payload["reason"]}
            )
        member.coordinator_phase = (
            suffix
            if suffix in ("aggregating", "completed", "aborted")
            else member.coordinator_phase
        )
        async with self.changed:
            self.changed.notify_all()

    # --- results and adapters ---------------------------------------------------------------------

    async def accept_result(self, doc: SignedDoc, sender: str) -> RoundResult:
        """A round's signed result: from its coordinator, or a takeover by one of its members."""
        claimed = doc.claimed(RoundResult)
        member = self.get(claimed.round_id)
        m = member.signed.manifest
        if sender not in (claimed.aggregator, self.ctx.node_id) or not (
            claimed.aggregator == m.coordinator or self._takeover_turn(member, claimed)
        ):
            raise HearthnetError(ErrorCode.FORBIDDEN, "not a result this node accepts")
        try:
            result = doc.open(RoundResult, claimed.aggregator)
        except HearthnetError:
            await self._security_event(sender, "round result")
            raise
        if result.manifest_sha != member.signed.manifest_sha:
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "result is for another manifest")
        done = member.result
        if done is not None and (
            done.claimed(RoundResult).aggregated_delta_sha == result.aggregated_delta_sha
        ):
            return result
        try:
            await self._verify_result(member, result)
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
        if not self.ctx.blobs.has(sha):
            _, blob = await self.ctx.bus.call_blob(
                CAP + "adapter.fetch",
                {"sha": sha},
                peer=self._peer(result.aggregator),
                timeout=C.FEDLEARN_BLOB_CALL_TIMEOUT_S,
                response_model=FetchResponse,
            )
            if blob is None or sha256_hex(blob) != sha:
                raise HearthnetError(
                    ErrorCode.PROTOCOL_ERROR, "fetched adapter does not match its SHA"
                )
        else:
            blob = await asyncio.to_thread(self.ctx.blobs.get, sha)
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
        if member.stage not in TERMINAL_STAGES:
            await self._emit(member, "completed", {"result": doc.model_dump()})
        log.info(
            "round completed", round_id=member.round_id, adapter_sha=sha, takeover=result.takeover
        )
        if self.ctx.config.fedlearn.auto_apply_aggregated:
            await self.install_adapter(sha)
            self.ctx.llm.set_node_adapter(sha)
        return result

    async def _verify_result(self, member: Membership, result: RoundResult) -> None:
        """What this node can check of a signed result beyond its signature: its own entry
        always; the adapter SHA by recomputation when it holds every submission listed."""
        me = self.ctx.node_id
        check_listing(result, me, member.submission, member.participants)
        if result.aggregator == me:
            return  # this node aggregated it itself
        held, receipts, masks = self._held(member)
        use, missing = held_for_recompute(result, held)
        if missing:
            log.debug(
                "result checked only in part: not every listed submission is held here",
                round_id=member.round_id,
                held=len(use),
                missing=len(missing),
            )
            return
        m = member.signed.manifest
        agg = await asyncio.to_thread(
            aggregate_submissions,
            member.signed,
            use,
            self.ctx.blobs.path,
            self.ctx.model_shapes(),
            masks if m.secure else None,
            receipt_influence({p: receipts[p] for p in use}),
        )
        check_recomputed(result, sha256_hex(agg.adapter))
        log.debug("result recomputed", round_id=member.round_id, submissions=len(use))

    def _held(
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

    def _check_mask_holders(self, member: Membership, holders: set[str]) -> None:
        """Mask only with keys of this node's community who enrolled in the round: a
        coordinator that slipped in keys of identities it controls (Sybils) could otherwise
        unmask this node's update from the pairwise masks it then knows."""
        me = self.ctx.node_id
        outsiders = sorted(holders - set(self.ctx.config.trust.roster) - {me})
        unenrolled = sorted(holders - member.participants - {me})
        if outsiders or unenrolled:
            who = (outsiders or unenrolled)[0]
            why = "outside this node's [trust] roster" if outsiders else "that never joined"
            raise HearthnetError(
                ErrorCode.SIGNATURE_INVALID,
                f"the mask roster holds a key of {who[:16]}…, {why}: this node does not mask "
                "with it and leaves the round",
                {"outsiders": outsiders, "unenrolled": unenrolled},
            )

    def _takeover_turn(self, member: Membership, claimed: RoundResult) -> bool:
        """A takeover result counts only from a member of the round, after the deadline, once
        that member's slot in the public preference order has come, and while this node cannot
        reach the coordinator either (otherwise the coordinator's result is the one to wait
        for). This node's own takeover is always its own."""
        taker = claimed.aggregator
        if not claimed.takeover:
            return False
        if taker == self.ctx.node_id:
            return True
        if taker not in member.participants or self.ctx.connected(
            member.signed.manifest.coordinator
        ):
            return False
        order = preference(member.round_id, member.participants | {self.ctx.node_id})
        turn = (
            C.FEDLEARN_TAKEOVER_GRACE_S
            + order.index(taker) * C.FEDLEARN_TAKEOVER_STAGGER_S
            - C.FEDLEARN_CLOCK_SKEW_S
        )
        return -self._seconds_left(member) >= turn

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

    # --- takeover ---------------------------------------------------------------------------------

    async def _watch_takeover(self, member: Membership) -> None:
        m = member.signed.manifest
        if m.coordinator == self.ctx.node_id:
            return
        await asyncio.sleep(max(0.0, self._seconds_left(member)) + C.FEDLEARN_TAKEOVER_GRACE_S)
        order = preference(member.round_id, member.participants | {self.ctx.node_id})
        await asyncio.sleep(order.index(self.ctx.node_id) * C.FEDLEARN_TAKEOVER_STAGGER_S)
        while member.stage not in TERMINAL_STAGES:
            if not self.ctx.connected(m.coordinator) and member.coordinator_phase != "completed":
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
            await asyncio.sleep(C.FEDLEARN_TAKEOVER_STAGGER_S)

    async def handover(
        self, caller: str, round_id: str, receipt: SignedDoc
    ) -> tuple[HandoverResponse, bytes]:
        member = self.get(round_id)
        m = member.signed.manifest
        issued = receipt.open(JoinReceipt, m.coordinator)
        if issued.participant != caller or issued.round_id != round_id:
            raise HearthnetError(ErrorCode.FORBIDDEN, "no valid join receipt for this round")
        if self._seconds_left(member) > 0 or self.ctx.connected(m.coordinator):
            raise HearthnetError(
                ErrorCode.FORBIDDEN, "submissions are handed over only in a takeover"
            )
        if member.submission is None or member.submitted_sha is None or member.receipt is None:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "this node has no submission for the round")
        member.participants.add(caller)
        data = await asyncio.to_thread(self.ctx.blobs.get, member.submitted_sha)
        masks = list((member.roster or {}).values())
        return HandoverResponse(
            submission=member.submission, receipt=member.receipt, masks=masks
        ), data

    def _check_handed(
        self, member: Membership, resp: HandoverResponse, data: bytes, peer: str
    ) -> None:
        m = member.signed.manifest
        resp.submission.verify(data)
        issued = resp.receipt.open(JoinReceipt, m.coordinator)
        if (
            resp.submission.participant != peer
            or issued.participant != peer
            or issued.round_id != member.round_id
            or resp.submission.round_id != member.round_id
        ):
            raise HearthnetError(ErrorCode.FORBIDDEN, "handed-over submission is not the peer's")
        limit = self.ctx.config.fedlearn.submission_max_bytes
        check_payload(member.signed, peer, data, self.ctx.model_shapes(), limit)

    async def takeover(self, round_id: str) -> SignedDoc:
        """Spec §5.7 finalize_takeover: aggregate the submissions this node can gather."""
        member = self.get(round_id)
        m = member.signed.manifest
        if member.result is not None:
            return member.result
        if member.receipt is None:
            raise HearthnetError(
                ErrorCode.FORBIDDEN, "only a participant of the round can take over"
            )
        if self._seconds_left(member) > 0:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "a takeover waits for the deadline")
        if self.ctx.connected(m.coordinator):
            raise HearthnetError(ErrorCode.FORBIDDEN, "the coordinator is reachable; it finalizes")
        subs: dict[str, ParticipantSubmission] = {}
        blobs: dict[str, str] = {}
        masks: dict[str, MaskKeyAnnouncement] = dict(member.roster or {})
        excluded: list[Exclusion] = []
        receipts: dict[str, SignedDoc] = {}
        if member.submission is not None and member.submitted_sha is not None:
            subs[self.ctx.node_id] = member.submission
            receipts[self.ctx.node_id] = member.receipt
            blobs[member.submission.delta_sha] = member.submitted_sha
        for peer in sorted(member.participants - {self.ctx.node_id}):
            try:
                resp, data = await self.ctx.bus.call_blob(
                    CAP + "round.handover",
                    {"round_id": round_id, "receipt": member.receipt.model_dump()},
                    peer=peer,
                    timeout=C.FEDLEARN_BLOB_CALL_TIMEOUT_S,
                    response_model=HandoverResponse,
                )
                if data is None:
                    raise HearthnetError(ErrorCode.PROTOCOL_ERROR, "handover without its delta")
                await asyncio.to_thread(self._check_handed, member, resp, data, peer)
            except HearthnetError as err:
                excluded.append(
                    Exclusion(participant=peer, reason=f"{err.code}: {err.message}"[:256])
                )
                continue
            subs[peer] = resp.submission
            receipts[peer] = resp.receipt
            blobs[resp.submission.delta_sha] = await asyncio.to_thread(self.ctx.blobs.put, data)
            for ann in resp.masks:
                masks.setdefault(ann.participant, ann)
            # kept, so a later result listing these submissions can be recomputed here
            member.handed[peer] = Submitted(resp.submission, blobs[resp.submission.delta_sha])
            member.handed_receipts[peer] = resp.receipt
            for ann in resp.masks:
                member.handed_masks.setdefault(ann.participant, ann)
        if len(subs) < m.min_participants:
            reason = (
                f"takeover gathered {len(subs)} submissions; the round needs {m.min_participants}"
            )
            raise HearthnetError(ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET, reason)
        agg = await asyncio.to_thread(
            aggregate_submissions,
            member.signed,
            subs,
            lambda sha: self.ctx.blobs.path(blobs[sha]),
            self.ctx.model_shapes(),
            masks if m.secure else None,
            receipt_influence(receipts),
        )
        sha = await asyncio.to_thread(self.ctx.blobs.put, agg.adapter)
        result = build_result(member.signed, agg, self.ctx.node_id, excluded, takeover=True)
        await self.ctx.record_reputation(round_id, observations(agg, {}))
        doc = SignedDoc.sign(self.ctx.identity, result)
        self.published.add(sha)
        await self.accept_result(doc, self.ctx.node_id)
        for peer in sorted(member.participants - {self.ctx.node_id}):
            with contextlib.suppress(HearthnetError):
                await self.ctx.bus.call(
                    CAP + "round.result",
                    {"result": doc.model_dump()},
                    peer=peer,
                    timeout=C.FEDLEARN_PEER_CALL_TIMEOUT_S,
                )
        log.info("takeover published", round_id=round_id, adapter_sha=sha, participants=len(subs))
        return doc
