"""Round manifests: what a round is, signed by its coordinator (docs/architecture.md).

A draft is validated against the node's `FedLearnConfig` and the constants, then frozen into a
`RoundManifest`, canonicalised (JCS) and signed. `SignedManifest` keeps the exact signed bytes:
receivers verify those bytes and parse the manifest from them, never a re-serialisation.
`manifest_sha` is the SHA-256 of the signed bytes.

This module is the one place an announce's omitted fields are filled
(`RoundManifestDraft.from_request`, then `build` for DP and clipping) and the one parser of a
signed manifest (`SignedManifest.parse`; `from_wire` adds the verification).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from ulid import ULID

from hearthnet import constants as C
from hearthnet.canonical import canonical_bytes, parse_canonical, sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn import secagg_graph
from hearthnet.fedlearn.clipping import ClipPolicy
from hearthnet.fedlearn.draft import (
    DEFAULT_DEADLINE_IN_S,
    DRAFT_DEFAULTS,
    RoundManifestDraft,
    check_against_config,
)
from hearthnet.fedlearn.rules.spec import RuleSpec
from hearthnet.fedlearn.terms import (
    AggregationSpec,
    LoraAggregation,
    RoundID,
    RoundParams,
    format_ts,
    new_round_id,
    parse_ts,
    validated,
)
from hearthnet.identity import NodeID, NodeIdentity, is_node_id, verify

# The draft and the shared terms moved to draft.py and terms.py; callers import them from here.
__all__ = [
    "DEFAULT_DEADLINE_IN_S",
    "DRAFT_DEFAULTS",
    "AggregationSpec",
    "LoraAggregation",
    "RoundID",
    "RoundManifest",
    "RoundManifestDraft",
    "SignedManifest",
    "check_against_config",
    "format_ts",
    "new_round_id",
    "parse_ts",
    "structural_problems",
]


class RoundManifest(RoundParams):
    """A signed round's terms: the draft's fields plus who coordinates, when, and the DP and
    clipping the draft left to the node's config."""

    kind: Literal["hearthnet.fedlearn.manifest/1"]
    round_id: Annotated[str, Field(min_length=26, max_length=26)]
    coordinator: str
    created_at: Annotated[str, Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")]
    deadline: Annotated[str, Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")]
    dp_noise_scale: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    clip_norm: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    # The clip policy (fedlearn/clipping.py): "adaptive" moves the topic's next clip toward the
    # clip_quantile of update norms by clip_learning_rate; each participant's bit carries
    # N(0, clip_count_noise²), which the ε of the round accounts (budget.py).
    clip_policy: ClipPolicy = "fixed"
    clip_quantile: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] = (
        C.FEDLEARN_CLIP_QUANTILE_DEFAULT
    )
    clip_learning_rate: Annotated[
        float, Field(gt=0.0, le=C.FEDLEARN_CLIP_LEARNING_RATE_MAX, allow_inf_nan=False)
    ] = C.FEDLEARN_CLIP_LEARNING_RATE_DEFAULT
    clip_count_noise: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0

    @field_validator("round_id")
    @classmethod
    def _ulid(cls, value: str) -> str:
        try:
            ULID.from_str(value)
        except ValueError as exc:
            raise ValueError("round_id is not a ULID") from exc
        return value

    @field_validator("coordinator")
    @classmethod
    def _coordinator(cls, value: str) -> str:
        if not is_node_id(value):
            raise ValueError("coordinator is not a NodeID")
        return value

    def model_post_init(self, _context: Any) -> None:
        """Enforce the cross-field rules on every construction, so no invalid manifest exists."""
        problems = structural_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> RoundManifest:
        """Validate; `manifest_invalid` names the first bad field."""
        return validated(cls, fields, "manifest")

    @property
    def deadline_at(self) -> datetime:
        """`deadline` as a datetime."""
        return parse_ts(self.deadline)

    @property
    def created_at_dt(self) -> datetime:
        """`created_at` as a datetime."""
        return parse_ts(self.created_at)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values: what is canonicalised and signed."""
        return self.model_dump(mode="json")


def structural_problems(m: RoundManifest) -> list[str]:
    """Cross-field rules every manifest obeys, whatever node checks it."""
    problems = []
    if m.min_participants > m.max_participants:
        problems.append("min_participants exceeds max_participants")
    if m.dp_noise_scale > 0 and m.clip_norm <= 0:
        problems.append("clip_norm must be > 0 when DP noise is on")
    if m.clip_policy == "adaptive":
        if m.secure:
            problems.append(
                "adaptive clipping is not available in secure rounds yet (the bit would have to "
                "travel masked): use --clip-policy fixed"
            )
        if m.clip_norm <= 0:
            problems.append("adaptive clipping needs clip_norm > 0 (its starting clip)")
        if m.dp_noise_scale > 0 and m.clip_count_noise <= 0:
            problems.append(
                "adaptive clipping with DP noise needs clip_count_noise > 0: an exact "
                "clipped/unclipped bit would leak what the noise hides"
            )
    if m.secure:
        if m.min_participants < C.FEDLEARN_SECURE_MIN_PARTICIPANTS:
            problems.append(
                "secure aggregation needs min_participants (--min-participants) >= "
                f"{C.FEDLEARN_SECURE_MIN_PARTICIPANTS}"
            )
        if m.clip_norm <= 0:
            problems.append(
                "secure aggregation needs clip_norm (--clip-norm) > 0 (it bounds the quantiser)"
            )
        if m.lora_aggregation == "product_svd":
            problems.append("secure aggregation cannot average B·A products; use frozen_a")
        if m.secure_bucket_size < 2:
            for n in range(
                max(C.FEDLEARN_SECURE_MIN_PARTICIPANTS, m.min_participants),
                m.max_participants + 1,
            ):
                try:
                    secagg_graph.derive(n, m.secagg_dropout, m.secagg_corruption)
                except HearthnetError as err:
                    problems.append(err.message)
                    break
    elif m.secure_bucket_size:
        problems.append("secure_bucket_size needs a secure round")
    try:
        spec = RuleSpec.parse(m.aggregation.rule, m.aggregation.params)
    except HearthnetError as err:
        problems.append(err.message)
    else:
        buckets = m.min_participants // max(m.secure_bucket_size, 1)
        if m.secure and spec.reputation_weighted:
            problems.append("secure aggregation hides who sent what: no reputation weighting")
        elif m.secure and spec.robust and m.secure_bucket_size < 2:
            problems.append(
                "secure aggregation with a robust rule runs it over bucket means: set "
                "secure_bucket_size (--bucket-size) to 2 or more"
            )
        elif m.secure and spec.robust and buckets < spec.minimum_n():
            need = spec.minimum_n() * m.secure_bucket_size
            problems.append(
                f"{spec.rule} defends nothing below {spec.minimum_n()} buckets; "
                f"min_participants {m.min_participants} in buckets of {m.secure_bucket_size} "
                f"gives {buckets}: raise min_participants (--min-participants) to {need}"
                + (
                    " or lower secure_bucket_size (--bucket-size)"
                    if m.secure_bucket_size > 2
                    else ""
                )
            )
        elif m.min_participants < spec.minimum_n():
            problems.append(
                f"{spec.rule} defends nothing below {spec.minimum_n()} updates; "
                f"min_participants is {m.min_participants}"
            )
    if parse_ts(m.deadline) <= parse_ts(m.created_at):
        problems.append("deadline is not after created_at")
    return problems


class SignedManifest:
    """A manifest with the exact bytes its coordinator signed."""

    __slots__ = ("body", "manifest", "signature")

    def __init__(self, manifest: RoundManifest, body: bytes, signature: bytes):
        self.manifest = manifest
        self.body = body
        self.signature = signature

    @classmethod
    def sign(cls, manifest: RoundManifest, identity: NodeIdentity) -> SignedManifest:
        """Canonicalise and sign; only the manifest's own coordinator may."""
        if manifest.coordinator != identity.node_id:
            raise HearthnetError(ErrorCode.MANIFEST_INVALID, "coordinator is not the signer")
        body = canonical_bytes(manifest.to_json())
        return cls(manifest, body, identity.sign(body))

    @property
    def round_id(self) -> RoundID:
        """The manifest's round."""
        return RoundID(self.manifest.round_id)

    @property
    def coordinator_sig(self) -> bytes:
        """The coordinator's Ed25519 signature over `body`."""
        return self.signature

    @property
    def manifest_sha(self) -> str:
        """SHA-256 of the signed bytes: how receipts and results name the manifest."""
        return sha256_hex(self.body)

    def to_wire(self) -> dict[str, str]:
        """`{body, signature}` (a `protocol.SignedDoc`), as offers and log records carry it."""
        return {"body": self.body.decode("utf-8"), "signature": self.signature.hex()}

    @classmethod
    def parse(cls, body: str, signature: str) -> SignedManifest:
        """The one parser of a signed manifest, without verifying it: for bytes verified before
        (log records, an adapter checked by `verify`) and under `from_wire`. Any failure is
        `signature_invalid` "manifest rejected", saying no more."""
        try:
            raw = body.encode("utf-8")
            manifest = RoundManifest.model_validate(parse_canonical(raw))
            return cls(manifest, raw, bytes.fromhex(signature))
        except (HearthnetError, TypeError, AttributeError, ValueError):
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "manifest rejected") from None

    @classmethod
    def from_wire(cls, data: Any, roster: Collection[str]) -> SignedManifest:
        """Parse and verify a manifest received from anywhere (`{body, signature}`); any failure
        is `signature_invalid`, saying no more: a bystander learns nothing about why."""
        try:
            body, signature = data["body"], data["signature"]
        except (KeyError, TypeError):
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "manifest rejected") from None
        signed = cls.parse(body, signature)
        signed.verify(roster)
        return signed

    def verify(self, roster: Collection[str]) -> None:
        """The coordinator must be in the trust roster and its signature must cover the bytes."""
        if self.manifest.coordinator not in roster or not verify(
            NodeID(self.manifest.coordinator), self.body, self.signature
        ):
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "manifest rejected")
