"""Aggregation of a round's stored submissions: check each payload, then run the rule.

`aggregate_submissions` is what both the coordinator and a takeover node run: the same signed
submissions in → the same adapter bytes out (docs/decisions.md), because participants are taken
in NodeID order, the means are exact, and the adapter file holds nothing node- or time-specific.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.aggregator import FedAvgAggregator
from hearthnet.fedlearn.aggregation.secure import (
    SecureFedAvgAggregator,
    deserialize_masked,
    masked_length,
    read_masked,
)
from hearthnet.fedlearn.delta import LazyDelta, deserialize_delta, validate_delta
from hearthnet.fedlearn.lora import ModelShapes
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.protocol import AuditEntry, JoinReceipt, SignedDoc
from hearthnet.fedlearn.publish import Aggregate, adapter_bytes
from hearthnet.fedlearn.reputation import Observation, influence
from hearthnet.fedlearn.secagg import Unmasked
from hearthnet.fedlearn.submission import ParticipantSubmission


def check_payload(
    signed: SignedManifest, participant: str, data: bytes, model_shapes: ModelShapes, limit: int
) -> None:
    """A submission's bytes as the coordinator and a takeover node both require them: a masked
    vector of the right length (secure rounds) or a valid delta, naming this round, manifest
    and participant. `delta_invalid` otherwise. Blocking: run it in a thread."""
    m = signed.manifest
    if m.secure:
        _, meta = deserialize_masked(data, masked_length(m, model_shapes), limit)
    else:
        delta, meta = deserialize_delta(data, limit)
        validate_delta(delta, m, model_shapes, len(data), limit)
    if (
        meta.get("round_id") != m.round_id
        or meta.get("manifest_sha") != signed.manifest_sha
        or meta.get("participant") != participant
    ):
        raise HearthnetError(ErrorCode.DELTA_INVALID, "delta metadata names another round")


def receipt_influence(receipts: Mapping[str, SignedDoc]) -> dict[str, float]:
    """Each participant's influence min(score³, cap) from the score its (already verified)
    join receipt carries."""
    return {p: influence(doc.claimed(JoinReceipt).reputation) for p, doc in receipts.items()}


def aggregate_submissions(
    signed: SignedManifest,
    submissions: Mapping[str, ParticipantSubmission],
    blob_path: Callable[[str], Path],
    model_shapes: ModelShapes,
    unmasked: Unmasked | None = None,
    influence: Mapping[str, float] | None = None,
) -> Aggregate:
    """Blocking (run it in a thread). Every submission must already have been validated
    (`check_payload`): deltas are streamed from the blob store, not parsed or checked again.
    `influence` (from the join receipts) matters only to a `reputation_weighted` rule."""
    manifest = signed.manifest
    order = sorted(submissions)
    if manifest.secure:
        if unmasked is None:
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED, "a secure round needs its recovered secrets"
            )
        shared = [*unmasked.request.survivors, *unmasked.request.dropped]
        secure = SecureFedAvgAggregator(manifest, model_shapes, unmasked.plan, shared)
        for p in order:
            sub = submissions[p]
            secure.add(sub, read_masked(blob_path(sub.delta_sha), secure.length))
        tensors = secure.aggregate(unmasked)
        audit: list[AuditEntry] = []
    else:
        plain = FedAvgAggregator(manifest, model_shapes, influence)
        for p in order:
            sub = submissions[p]
            plain.add(sub, LazyDelta(blob_path(sub.delta_sha)))
        tensors, verdicts = plain.aggregate_audited()
        audit = [
            AuditEntry(
                participant=p,
                action=v.action,
                influence=v.influence,
                deviation=v.deviation,
                reason=v.reason,
            )
            for p, v in verdicts.items()
        ]
    total = sum(submissions[p].num_samples for p in order)
    used = {p: submissions[p] for p in order}
    return Aggregate(adapter_bytes(tensors, signed), order, total, audit, used)


def observations(aggregate: Aggregate, rejected: Mapping[str, str]) -> list[Observation]:
    """What a round showed about each participant, for the reputation table: the rule's
    verdicts for included updates, a rejection for participants with none included."""
    seen = [Observation(a.participant, a.action, a.deviation, a.reason) for a in aggregate.audit]
    included = set(aggregate.included)
    seen += [
        Observation(p, "rejected", 0.0, reason)
        for p, reason in sorted(rejected.items())
        if p not in included
    ]
    return seen
