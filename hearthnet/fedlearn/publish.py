"""The published adapter and round result (docs/decisions.md).

The adapter file carries its signed manifest, so anyone who fetches it by SHA can apply it; it
holds nothing node- or time-specific, so every node that aggregates the same submissions
(`aggregation/run.py`) publishes the same bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch
from safetensors.torch import load as torch_load
from safetensors.torch import save as torch_save

from hearthnet import constants as C
from hearthnet.canonical import sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.delta import canonical_safetensors, read_header
from hearthnet.fedlearn.lora import A_SUFFIX, B_SUFFIX, ModelShapes, target_layers
from hearthnet.fedlearn.manifest import SignedManifest, format_ts
from hearthnet.fedlearn.protocol import AuditEntry, Exclusion, RoundResult, SubmissionRef
from hearthnet.fedlearn.submission import ParticipantSubmission

FETCH_CAPABILITY = C.FEDLEARN_CAP_PREFIX + "adapter.fetch"


@dataclass(frozen=True)
class Aggregate:
    """A round's aggregated adapter and what went into it."""

    adapter: bytes
    included: list[str]
    total_samples: int
    audit: list[AuditEntry] = field(default_factory=list)
    # participant -> the signed submission that went in
    signed: dict[str, ParticipantSubmission] = field(default_factory=dict)


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
        signed = SignedManifest.parse(metadata["manifest"], metadata["manifest_signature"])
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
    """The round's result document (signed by the caller): what went in, what the rule did, and
    where the adapter is fetched."""
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
            SubmissionRef(
                participant=p,
                delta_sha=sub.delta_sha,
                num_samples=sub.num_samples,
                steps=sub.steps,
                clip_bit=sub.clip_bit,
                signature=sub.signature,
            )
            for p, sub in ((p, aggregate.signed[p]) for p in aggregate.included)
        ],
    )
