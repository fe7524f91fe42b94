"""Aggregation of a round's stored submissions, and the published adapter and result.

`aggregate_submissions` is what both the coordinator and a takeover node run: the same signed
submissions in → the same adapter bytes out (DESIGN.md §4), because participants are taken in
NodeID order, the means are exact, and the adapter file holds nothing node- or time-specific.
The adapter file carries its signed manifest, so anyone who fetches it by SHA can apply it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load as torch_load
from safetensors.torch import save as torch_save

from hearthnet import constants as C
from hearthnet.canonical import parse_canonical, sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregator import FedAvgAggregator
from hearthnet.fedlearn.delta import (
    LazyDelta,
    ParticipantSubmission,
    canonical_safetensors,
    deserialize_delta,
    read_header,
    validate_delta,
)
from hearthnet.fedlearn.lora import A_SUFFIX, B_SUFFIX, ModelShapes, target_layers
from hearthnet.fedlearn.manifest import RoundManifest, SignedManifest, format_ts
from hearthnet.fedlearn.protocol import (
    AuditEntry,
    Exclusion,
    JoinReceipt,
    RoundResult,
    SignedDoc,
    SubmissionRef,
)
from hearthnet.fedlearn.reputation import Observation, influence
from hearthnet.fedlearn.secure import (
    MaskKeyAnnouncement,
    SecureFedAvgAggregator,
    deserialize_masked,
    masked_length,
)

FETCH_CAPABILITY = "experimental.fedlearn.adapter.fetch"


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


@dataclass(frozen=True)
class Aggregate:
    adapter: bytes
    included: list[str]
    total_samples: int
    audit: list[AuditEntry] = field(default_factory=list)
    # participant -> (delta_sha, num_samples) of the signed submission that went in
    signed: dict[str, tuple[str, int]] = field(default_factory=dict)


def receipt_influence(receipts: Mapping[str, SignedDoc]) -> dict[str, float]:
    """Each participant's influence min(score³, cap) from the score its (already verified)
    join receipt carries."""
    return {p: influence(doc.claimed(JoinReceipt).reputation) for p, doc in receipts.items()}


def aggregate_submissions(
    signed: SignedManifest,
    submissions: Mapping[str, ParticipantSubmission],
    blob_path: Callable[[str], Path],
    model_shapes: ModelShapes,
    masks: Mapping[str, MaskKeyAnnouncement] | None = None,
    influence: Mapping[str, float] | None = None,
) -> Aggregate:
    """Blocking (run it in a thread). Every submission must already have been validated.
    `influence` (from the join receipts) matters only to a `reputation_weighted` rule."""
    manifest = signed.manifest
    order = sorted(submissions)
    if manifest.secure:
        secure = SecureFedAvgAggregator(manifest, model_shapes, masks or {}, signed.manifest_sha)
        for p in order:
            sub = submissions[p]
            data = blob_path(sub.delta_sha).read_bytes()
            vec, _ = deserialize_masked(data, secure.length)
            secure.add(sub, vec)
        tensors = secure.aggregate()
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
    used = {p: (submissions[p].delta_sha, submissions[p].num_samples) for p in order}
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


def adapter_bytes(tensors: Mapping[str, torch.Tensor], signed: SignedManifest) -> bytes:
    """The aggregated adapter (A and B of every layer) with its signed manifest in the header."""
    data = {k: v.detach().contiguous().to(torch.float32) for k, v in sorted(tensors.items())}
    metadata = {
        "format": C.FEDLEARN_ADAPTER_FORMAT,
        "round_id": signed.manifest.round_id,
        "manifest_sha": signed.manifest_sha,
        "manifest": signed.body.decode("utf-8"),
        "manifest_signature": signed.signature.hex(),
    }
    return canonical_safetensors(torch_save(data, metadata))


def read_adapter(data: bytes) -> tuple[dict[str, torch.Tensor], SignedManifest]:
    """Parse a published adapter; `delta_invalid` if it is not one (its SHA is checked by the
    caller, who asked for it by SHA)."""
    _, metadata = read_header(data, C.BLOB_MAX_BYTES)
    if metadata.get("format") != C.FEDLEARN_ADAPTER_FORMAT:
        raise HearthnetError(ErrorCode.DELTA_INVALID, "not a hearthnet adapter")
    try:
        body = metadata["manifest"].encode("utf-8")
        manifest = RoundManifest.model_validate(parse_canonical(body))
        signed = SignedManifest(manifest, body, bytes.fromhex(metadata["manifest_signature"]))
        tensors = torch_load(data)
    except (KeyError, ValueError, HearthnetError) as exc:
        raise HearthnetError(ErrorCode.DELTA_INVALID, f"adapter unreadable: {exc}") from None
    return tensors, signed


def check_adapter(
    data: bytes,
    expected: SignedManifest,
    roster: Collection[str],
    model_shapes: ModelShapes,
) -> None:
    """Is `data` a servable adapter of the round `expected`? Its embedded manifest is that
    round's and carries a valid signature by a trusted coordinator; it holds exactly A and B of
    every target layer in the manifest's shapes, in float32, all finite. Anything else is
    `signature_invalid` or `delta_invalid`, and is neither installed nor served."""
    tensors, embedded = read_adapter(data)
    if embedded.manifest_sha != expected.manifest_sha:
        raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "adapter is for another manifest")
    embedded.verify(roster)
    m = embedded.manifest
    want: dict[str, tuple[int, int]] = {}
    for path, (fan_out, fan_in) in target_layers(m, model_shapes).items():
        want[path + A_SUFFIX] = (m.lora_rank, fan_in)
        want[path + B_SUFFIX] = (fan_out, m.lora_rank)
    if set(tensors) != set(want):
        odd = sorted(set(tensors) ^ set(want))[0]
        raise HearthnetError(ErrorCode.DELTA_INVALID, "adapter tensors differ", {"key": odd})
    for key, shape in want.items():
        t = tensors[key]
        if t.dtype != torch.float32 or tuple(t.shape) != shape:
            raise HearthnetError(ErrorCode.DELTA_INVALID, f"adapter tensor {key} is malformed")
        if not bool(torch.isfinite(t).all()):
            raise HearthnetError(ErrorCode.DELTA_INVALID, f"adapter tensor {key} is not finite")


def build_result(
    signed: SignedManifest,
    aggregate: Aggregate,
    aggregator: str,
    excluded: list[Exclusion],
    takeover: bool,
    now: datetime | None = None,
) -> RoundResult:
    sha = sha256_hex(aggregate.adapter)
    m = signed.manifest
    return RoundResult(
        round_id=m.round_id,
        manifest_sha=signed.manifest_sha,
        aggregated_delta_sha=sha,
        n_participants=len(aggregate.included),
        total_samples=aggregate.total_samples,
        aggregator=aggregator,
        completed_at=format_ts(now or datetime.now(UTC)),
        download_url=f"hearthnet://{aggregator}/{FETCH_CAPABILITY}?sha={sha}",
        rule=m.aggregation.rule,
        lora_aggregation=m.lora_aggregation,
        secure=m.secure,
        included=aggregate.included,
        excluded=sorted(excluded, key=lambda e: e.participant),
        takeover=takeover,
        rule_params=dict(m.aggregation.params),
        audit=aggregate.audit,
        submissions=[
            SubmissionRef(participant=p, delta_sha=sha, num_samples=n)
            for p, (sha, n) in ((p, aggregate.signed[p]) for p in aggregate.included)
        ],
    )
