"""A round's terms as a coordinator chooses them: the fields the draft and the signed manifest
share (`RoundParams`), the aggregation spec, round ids and the one timestamp spelling.

Split from manifest.py so the draft (draft.py) and the manifest can both build on it without
importing each other at load time."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NewType, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ulid import ULID

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError, first_problem

RoundID = NewType("RoundID", str)
LoraAggregation = Literal["frozen_a", "product_svd", "fedavg_ab"]

_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA_RE = r"^[0-9a-f]{64}$"
_TOPIC_RE = r"^[a-z0-9][a-z0-9._-]*$"
_ParamValue = int | float | str | bool
_M = TypeVar("_M", bound=BaseModel)


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


class RoundParams(BaseModel):
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
    # SecAgg+ (secagg_graph.py): the drop-out and corruption fractions a secure round is built
    # to tolerate; the neighbour graph's degree and threshold follow from them and the roster.
    secagg_dropout: Annotated[float, Field(ge=0.0, lt=0.5, allow_inf_nan=False)] = (
        C.FEDLEARN_SECAGG_DROPOUT_DEFAULT
    )
    secagg_corruption: Annotated[float, Field(ge=0.0, lt=0.5, allow_inf_nan=False)] = (
        C.FEDLEARN_SECAGG_CORRUPTION_DEFAULT
    )
    # Secure + robust: members are split into buckets of this size by a public seed, secure
    # aggregation runs per bucket, and the robust rule runs over the bucket means (0: no
    # buckets, plain fedavg only).
    secure_bucket_size: Annotated[int, Field(ge=0, le=C.FEDLEARN_SECURE_MAX_BUCKET)] = 0
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


def validated(model: type[_M], fields: dict[str, Any], what: str) -> _M:
    """`model` from `fields`; `manifest_invalid` names the first bad field."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        where, reason = first_problem(exc, what)
        # a rule across fields (no one field to name) reads as the rule itself
        said = reason if where in (what, "") else f"{what} field '{where}': {reason}"
        raise HearthnetError(ErrorCode.MANIFEST_INVALID, said) from None
