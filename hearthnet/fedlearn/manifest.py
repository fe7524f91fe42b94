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

import re
import secrets
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, NewType, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ulid import ULID

from hearthnet import constants as C
from hearthnet.canonical import canonical_bytes, parse_canonical, sha256_hex
from hearthnet.config import FedLearnConfig
from hearthnet.errors import ErrorCode, HearthnetError, first_problem
from hearthnet.fedlearn.rules.spec import RuleSpec
from hearthnet.identity import NodeID, NodeIdentity, is_node_id, verify

RoundID = NewType("RoundID", str)
LoraAggregation = Literal["frozen_a", "product_svd", "fedavg_ab"]

_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA_RE = r"^[0-9a-f]{64}$"
_TOPIC_RE = r"^[a-z0-9][a-z0-9._-]*$"
_ParamValue = int | float | str | bool
_M = TypeVar("_M", bound=BaseModel)


# What an announce may leave out, besides what the node fills from its model and config
# (`RoundManifestDraft.from_request`). `topic` and `consent_text` have no default: an operator
# writes them.
DRAFT_DEFAULTS: dict[str, Any] = {
    "lora_target_modules": ["q_proj", "v_proj"],
    "lora_rank": 8,
    "train_steps": 50,
    "learning_rate": 1e-3,
    "batch_size": 4,
}
DEFAULT_DEADLINE_IN_S = 3600


def new_round_id() -> RoundID:
    """A fresh round ID (a ULID: sortable by creation time)."""
    return RoundID(str(ULID()))


def format_ts(when: datetime) -> str:
    """RFC 3339 UTC with second precision, the one spelling used in signed objects."""
    if when.tzinfo is None:
        raise HearthnetError(ErrorCode.MANIFEST_INVALID, "timestamps must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ts(text: str) -> datetime:
    """The inverse of `format_ts`."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


class AggregationSpec(BaseModel):
    """The aggregation rule and its parameters (robust rules plug in by name)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    rule: Annotated[str, Field(pattern=r"^[a-z_]{1,32}$")] = "fedavg"
    params: Annotated[dict[str, _ParamValue], Field(max_length=C.FEDLEARN_RULE_PARAMS_MAX)] = {}


class _RoundParams(BaseModel):
    """Fields a coordinator chooses; shared by the draft and the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    base_model_id: Annotated[str, Field(min_length=1, max_length=C.FEDLEARN_MODEL_ID_MAX_LEN)]
    base_model_sha: Annotated[str, Field(pattern=_SHA_RE)]
    # strict=False only so a JSON list becomes the tuple; items must still be strings.
    lora_target_modules: Annotated[
        tuple[str, ...],
        Field(min_length=1, max_length=C.FEDLEARN_MAX_LORA_TARGET_MODULES, strict=False),
    ]
    lora_rank: Annotated[int, Field(ge=C.FEDLEARN_MIN_LORA_RANK, le=C.FEDLEARN_MAX_LORA_RANK)]
    lora_alpha: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_LORA_ALPHA)]
    lora_dropout: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] = 0.0
    train_steps: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_TRAIN_STEPS)]
    learning_rate: Annotated[
        float, Field(gt=0.0, le=C.FEDLEARN_MAX_LEARNING_RATE, allow_inf_nan=False)
    ]
    batch_size: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_BATCH_SIZE)]
    seed: Annotated[int, Field(ge=0, le=C.FEDLEARN_MAX_SEED)]
    min_participants: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_PARTICIPANTS)]
    max_participants: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_PARTICIPANTS)]
    topic: Annotated[
        str, Field(min_length=1, max_length=C.FEDLEARN_TOPIC_MAX_LEN, pattern=_TOPIC_RE)
    ]
    consent_text: Annotated[str, Field(min_length=1, max_length=C.FEDLEARN_CONSENT_TEXT_MAX_LEN)]
    aggregation: AggregationSpec = AggregationSpec()
    lora_aggregation: LoraAggregation = "frozen_a"
    secure: bool = False
    min_reputation: Annotated[float, Field(allow_inf_nan=False)] | None = None

    @field_validator("lora_target_modules")
    @classmethod
    def _modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if len(name) > C.FEDLEARN_MODULE_NAME_MAX_LEN or not _MODULE_RE.match(name):
                raise ValueError(f"invalid module name {name[:64]!r}")
        if len(set(value)) != len(value):
            raise ValueError("module names repeat")
        return value


class RoundManifestDraft(_RoundParams):
    """What an operator asks for; DP and clip default to the node's config."""

    deadline: datetime
    dp_noise_scale: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    clip_norm: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> RoundManifestDraft:
        """A draft from JSON-ish fields (the CLI, a TOML file): an ISO 8601 `deadline` string and
        a bare rule name for `aggregation` are accepted; `manifest_invalid` names the field."""
        fields = dict(fields)
        if isinstance(fields.get("deadline"), str):
            try:
                fields["deadline"] = datetime.fromisoformat(fields["deadline"])
            except ValueError:
                raise HearthnetError(
                    ErrorCode.MANIFEST_INVALID, "deadline is not an ISO 8601 time"
                ) from None
        if isinstance(fields.get("aggregation"), str):
            fields["aggregation"] = {"rule": fields["aggregation"]}
        return _validated(cls, fields, "draft")

    @classmethod
    def from_request(
        cls,
        fields: Mapping[str, Any],
        config: FedLearnConfig,
        base_model_id: str,
        base_model_sha: str,
        now: datetime | None = None,
    ) -> RoundManifestDraft:
        """A draft from what the operator set (`round.announce`), the rest filled here:
        `DRAFT_DEFAULTS`, this node's base model, a random seed, `[fedlearn]`
        `min_round_participants`/`max_round_participants`, `lora_alpha` = 2 × `lora_rank`, and
        a `deadline` `deadline_in_s` (default 1 h) from now. DP noise and clipping default in
        `build`. The CLI and the service pass through only what was set."""
        given = dict(fields)
        filled: dict[str, Any] = {
            **DRAFT_DEFAULTS,
            "base_model_id": base_model_id,
            "base_model_sha": base_model_sha,
            "seed": secrets.randbelow(2**31),
            "min_participants": config.min_round_participants,
            "max_participants": config.max_round_participants,
            **given,
        }
        if "lora_alpha" not in given and isinstance(filled["lora_rank"], int):
            filled["lora_alpha"] = 2 * filled["lora_rank"]
        seconds = filled.pop("deadline_in_s", DEFAULT_DEADLINE_IN_S)
        if "deadline" not in filled:
            if not isinstance(seconds, int | float) or not 0 < seconds <= C.FEDLEARN_MAX_DEADLINE_S:
                raise HearthnetError(
                    ErrorCode.MANIFEST_INVALID,
                    f"deadline_in_s is out of range: more than 0, at most "
                    f"{C.FEDLEARN_MAX_DEADLINE_S // 86400} days (--deadline-in)",
                )
            filled["deadline"] = (now or datetime.now(UTC)) + timedelta(seconds=float(seconds))
        return cls.from_fields(filled)

    def build(
        self,
        identity: NodeIdentity,
        config: FedLearnConfig,
        now: datetime | None = None,
        round_id: RoundID | None = None,
    ) -> SignedManifest:
        """Validate against `config` and the constants, then sign; `manifest_invalid` if not."""
        now = now or datetime.now(UTC)
        fields: dict[str, Any] = self.model_dump(
            exclude={"deadline", "dp_noise_scale", "clip_norm"}
        )
        fields.update(
            kind=C.FEDLEARN_MANIFEST_KIND,
            round_id=round_id or new_round_id(),
            coordinator=identity.node_id,
            created_at=format_ts(now),
            deadline=format_ts(self.deadline),
            dp_noise_scale=(
                config.dp_noise_scale_default
                if self.dp_noise_scale is None
                else self.dp_noise_scale
            ),
            clip_norm=config.clip_norm_default if self.clip_norm is None else self.clip_norm,
        )
        manifest = RoundManifest.from_fields(fields)
        check_against_config(manifest, config, now)
        return SignedManifest.sign(manifest, identity)


class RoundManifest(_RoundParams):
    """A signed round's terms: the draft's fields plus who coordinates, when, and the DP and
    clipping the draft left to the node's config."""

    kind: Literal["hearthnet.fedlearn.manifest/1"]
    round_id: Annotated[str, Field(min_length=26, max_length=26)]
    coordinator: str
    created_at: Annotated[str, Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")]
    deadline: Annotated[str, Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")]
    dp_noise_scale: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    clip_norm: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]

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
        problems = structural_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> RoundManifest:
        """Validate; `manifest_invalid` names the first bad field."""
        return _validated(cls, fields, "manifest")

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


def _validated(model: type[_M], fields: dict[str, Any], what: str) -> _M:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        where, reason = first_problem(exc, what)
        raise HearthnetError(
            ErrorCode.MANIFEST_INVALID, f"{what} field '{where}': {reason}"
        ) from None


def structural_problems(m: RoundManifest) -> list[str]:
    """Cross-field rules every manifest obeys, whatever node checks it."""
    problems = []
    if m.min_participants > m.max_participants:
        problems.append("min_participants exceeds max_participants")
    if m.dp_noise_scale > 0 and m.clip_norm <= 0:
        problems.append("clip_norm must be > 0 when DP noise is on")
    if m.secure:
        if m.min_participants < C.FEDLEARN_SECURE_MIN_PARTICIPANTS:
            problems.append(
                f"secure aggregation needs min_participants >= {C.FEDLEARN_SECURE_MIN_PARTICIPANTS}"
            )
        if m.clip_norm <= 0:
            problems.append("secure aggregation needs clip_norm > 0 (it bounds the quantiser)")
        if m.lora_aggregation == "product_svd":
            problems.append("secure aggregation cannot average B·A products; use frozen_a")
    try:
        spec = RuleSpec.parse(m.aggregation.rule, m.aggregation.params)
    except HearthnetError as err:
        problems.append(err.message)
    else:
        if m.secure and (spec.robust or spec.reputation_weighted):
            problems.append("secure aggregation only sums: the rule must be plain fedavg")
        if m.min_participants < spec.minimum_n():
            problems.append(
                f"{spec.rule} defends nothing below {spec.minimum_n()} updates; "
                f"min_participants is {m.min_participants}"
            )
    if parse_ts(m.deadline) <= parse_ts(m.created_at):
        problems.append("deadline is not after created_at")
    return problems


def check_against_config(m: RoundManifest, config: FedLearnConfig, now: datetime) -> None:
    """The node-specific limits: a coordinator checks its draft, a participant what it joins."""
    # Each problem names the node's [fedlearn] key and the announce flag: either side can fix it.
    problems = []
    if m.lora_rank > config.max_lora_rank:
        problems.append(
            f"lora_rank {m.lora_rank} exceeds this node's [fedlearn] max_lora_rank "
            f"{config.max_lora_rank} (announce with a lower --rank, or raise that key)"
        )
    if len(m.lora_target_modules) > config.max_lora_target_modules:
        problems.append(
            f"too many lora_target_modules ({len(m.lora_target_modules)}): this node's "
            f"[fedlearn] max_lora_target_modules is {config.max_lora_target_modules} "
            "(announce with fewer --modules, or raise that key)"
        )
    if m.train_steps > config.max_train_steps:
        problems.append(
            f"train_steps {m.train_steps} exceeds this node's [fedlearn] max_train_steps "
            f"{config.max_train_steps} (announce with fewer --steps, or raise that key)"
        )
    if m.max_participants > config.max_round_participants:
        problems.append(
            f"max_participants {m.max_participants} exceeds this node's [fedlearn] "
            f"max_round_participants {config.max_round_participants} (announce with a lower "
            "--max-participants, or raise that key)"
        )
    if m.min_participants < config.min_round_participants:
        problems.append(
            f"min_participants {m.min_participants} is below this node's [fedlearn] "
            f"min_round_participants {config.min_round_participants} (announce with "
            f"--min-participants {config.min_round_participants} or more, or lower that key)"
        )
    deadline = m.deadline_at
    if deadline <= now:
        problems.append("deadline is not in the future (--deadline-in)")
    elif deadline - now > timedelta(seconds=C.FEDLEARN_MAX_DEADLINE_S):
        problems.append(
            f"deadline is too far in the future: at most {C.FEDLEARN_MAX_DEADLINE_S // 86400} "
            "days (--deadline-in)"
        )
    if problems:
        raise HearthnetError(
            ErrorCode.MANIFEST_INVALID, "; ".join(problems), {"problems": problems}
        )


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
