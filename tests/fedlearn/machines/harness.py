"""Carry out a round machine's effects the way its driver does, without asyncio or sockets:
the log is sealed events in memory, blobs are a real `BlobStore`, timers and background
finalizes are recorded for the test to fire, and aggregation is the real one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hearthnet.blobs import BlobStore
from hearthnet.config import FedLearnConfig, NodeConfig, NodeSection
from hearthnet.errors import HearthnetError
from hearthnet.eventlog.event import Event, encode_payload, seal
from hearthnet.fedlearn.aggregation.run import aggregate_submissions, check_payload
from hearthnet.fedlearn.delta import serialize_delta
from hearthnet.fedlearn.events import Payload
from hearthnet.fedlearn.machines import effects as fx
from hearthnet.fedlearn.machines import finalize
from hearthnet.fedlearn.machines.coordinator import CoordinatorMachine
from hearthnet.fedlearn.manifest import RoundID, RoundManifestDraft, SignedManifest
from hearthnet.fedlearn.protocol import SignedDoc, SubmitReceipt
from hearthnet.fedlearn.publish import Aggregate
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.identity import NodeIdentity
from tests.fedlearn.conftest import DRAFT, MODEL_SHAPES, random_delta

T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
ROUND_ID = RoundID("01JWM2P3T9Q8XKZ4N6V7B5C0DE")
BASE_SHA = DRAFT["base_model_sha"]


def node_config(tmp_path: Path, **fedlearn: Any) -> NodeConfig:
    """A node's config as the daemon would load it, with `[fedlearn]` overrides."""
    return NodeConfig(
        node=NodeSection(name="coord", data_dir=tmp_path), fedlearn=FedLearnConfig(**fedlearn)
    )


def draft(**overrides: Any) -> RoundManifestDraft:
    """The conftest draft, an hour after T0 unless told otherwise."""
    return RoundManifestDraft(**{**DRAFT, "deadline": T0 + timedelta(hours=1), **overrides})


def submission(
    identity: NodeIdentity, signed: SignedManifest, seed: int, samples: int = 4
) -> tuple[ParticipantSubmission, bytes]:
    """A participant's signed submission of a random delta for the round."""
    data = serialize_delta(
        random_delta(signed, seed),
        manifest_sha=signed.manifest_sha,
        round_id=signed.manifest.round_id,
        participant=identity.node_id,
    )
    return ParticipantSubmission.create(
        identity, signed.manifest.round_id, data, samples, 1.5, steps=10
    ), data


def aggregate(blobs: BlobStore, want: fx.Aggregate) -> Aggregate:
    """The `Aggregate` effect, carried out as the drivers do."""
    return aggregate_submissions(
        want.signed,
        want.submissions,
        lambda sha: blobs.path(want.blobs.get(sha, sha)),
        MODEL_SHAPES,
        want.unmasked,
        want.influence,
    )


class MemoryLog:
    """Sealed events in order, as `EventLog.append` makes them."""

    def __init__(self, identity: NodeIdentity, events: list[Event] | None = None):
        self.identity = identity
        self.events = list(events or [])

    def append(self, event_type: str, payload: Payload) -> Event:
        prev = self.events[-1].hash if self.events else "0" * 64
        event = seal(
            self.identity,
            len(self.events) + 1,
            prev,
            event_type,
            encode_payload(payload.body()),
            "2026-06-01T12:00:00.000000Z",
        )
        self.events.append(event)
        return event

    def types(self) -> list[str]:
        return [e.type.removeprefix("fedlearn.round.") for e in self.events]


class CoordinatorHarness:
    """A coordinator machine and what its driver would do with each effect."""

    def __init__(
        self, identity: NodeIdentity, config: NodeConfig, blobs: BlobStore, log: MemoryLog
    ):
        self.machine = CoordinatorMachine(identity, config)
        self.config = config
        self.blobs = blobs
        self.log = log
        self.timers: dict[str, datetime] = {}
        self.finalize_asked: list[str] = []
        self.reputation: list[fx.RecordReputation] = []

    @classmethod
    def restored(cls, other: CoordinatorHarness, upto: int | None = None) -> CoordinatorHarness:
        """A fresh node that folds `other`'s log (its first `upto` events) and carries on."""
        log = MemoryLog(other.log.identity, other.log.events[:upto])
        fresh = cls(other.log.identity, other.config, other.blobs, log)
        fresh.run(fresh.machine.restore(log.events))
        return fresh

    def run(self, effects: list[fx.Effect]) -> None:
        for effect in effects:
            if isinstance(effect, fx.Append):
                event = self.log.append(effect.type, effect.payload)
                stored = type(effect.payload).model_validate(event.payload)  # the log leads
                self.run(self.machine.apply(effect.type, stored))
            elif isinstance(effect, fx.StoreBlob):
                self.blobs.put(effect.data)
            elif isinstance(effect, fx.SetTimer):
                self.timers[effect.name] = effect.at
            elif isinstance(effect, fx.Finalize):
                self.finalize_asked.append(effect.round_id)
            elif isinstance(effect, fx.RecordReputation):
                self.reputation.append(effect)
            else:
                assert isinstance(effect, fx.Log)

    def announce(self, now: datetime = T0, **overrides: Any) -> SignedManifest:
        signed, effects = self.machine.announce(draft(**overrides), BASE_SHA, now, ROUND_ID)
        self.run(effects)
        return signed

    def enroll(self, who: NodeIdentity, now: datetime = T0, score: float = 0.5) -> SignedDoc:
        sha = self.machine.get(ROUND_ID).signed.manifest_sha
        receipt, effects = self.machine.enroll(who.node_id, ROUND_ID, sha, now, score, False)
        self.run(effects)
        return receipt

    def submit(
        self,
        who: NodeIdentity,
        sub: ParticipantSubmission,
        receipt: SignedDoc,
        data: bytes,
        now: datetime = T0,
    ) -> SubmitReceipt:
        """`accept_submission` of the driver: check, payload check, reject or record."""
        record = self.machine.get(sub.round_id)
        limit = self.config.fedlearn.submission_max_bytes
        try:
            self.machine.check_submission(who.node_id, sub, receipt, data, now)
            check_payload(record.signed, sub.participant, data, MODEL_SHAPES, limit)
        except HearthnetError as err:
            self.run(self.machine.reject(sub.round_id, who.node_id, err))
            raise
        answer, effects = self.machine.submitted(sub, data, self.blobs.put(data), now)
        self.run(effects)
        return answer

    def finalize(self, now: datetime = T0) -> SignedDoc:
        """`finalize` of the driver."""
        done, effects = self.machine.close(ROUND_ID)
        if done is not None:
            return done
        self.run(effects)
        step = self.machine.plan(ROUND_ID)
        if isinstance(step, finalize.Abort):
            self.run(self.machine.abort(ROUND_ID, step))
            raise step.error()
        doc, effects = self.machine.aggregated(ROUND_ID, aggregate(self.blobs, step), now)
        self.run(effects)
        return doc
