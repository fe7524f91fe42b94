"""Node configuration, loaded from TOML and validated by pydantic.

Unknown keys, wrong types and out-of-range limits fail at start with a message naming the key
(`fedlearn.max_lora_rank`) and the reason. Limits come from `hearthnet.constants`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.identity import NodeID, parse_node_id


def _node_id(value: str) -> NodeID:
    try:
        return parse_node_id(value)
    except HearthnetError as exc:
        raise ValueError(exc.message) from None


NodeIDField = Annotated[str, AfterValidator(_node_id)]
# TOML gives paths as strings; strict mode would otherwise demand Path objects.
PathField = Annotated[Path, Field(strict=False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FedLearnConfig(_Section):
    """`[fedlearn]`: the operator's limits on rounds this node runs or joins (each bounded by a
    ceiling in `hearthnet.constants`). The master switch is `[experimental] fedlearn` (one
    switch, not two: docs/decisions.md, "One master switch")."""

    max_lora_rank: Annotated[
        int, Field(ge=C.FEDLEARN_MIN_LORA_RANK, le=C.FEDLEARN_MAX_LORA_RANK)
    ] = C.FEDLEARN_MAX_LORA_RANK
    max_lora_target_modules: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_LORA_TARGET_MODULES)] = (
        C.FEDLEARN_MAX_LORA_TARGET_MODULES
    )
    max_train_steps: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_TRAIN_STEPS)] = (
        C.FEDLEARN_MAX_TRAIN_STEPS
    )
    max_round_participants: Annotated[int, Field(ge=2, le=C.FEDLEARN_MAX_PARTICIPANTS)] = (
        C.FEDLEARN_MAX_PARTICIPANTS
    )
    min_round_participants: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_PARTICIPANTS)] = (
        C.FEDLEARN_MIN_PARTICIPANTS
    )
    dp_noise_scale_default: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = (
        C.FEDLEARN_DP_NOISE_SCALE_DEFAULT
    )
    clip_norm_default: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = (
        C.FEDLEARN_CLIP_NORM_DEFAULT
    )
    # The clip policy of new drafts (fedlearn/clipping.py): "adaptive" follows the quantile
    # clip_quantile_default of update norms round to round; clip_count_noise_default is the
    # noise σ_b on each participant's clipped/unclipped bit in DP rounds (unset: σ_b equals the
    # delta's noise multiplier, so the bit costs ~12% more ε; 0 in rounds without DP).
    clip_policy_default: Literal["fixed", "adaptive"] = C.FEDLEARN_CLIP_POLICY_DEFAULT
    clip_quantile_default: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] = (
        C.FEDLEARN_CLIP_QUANTILE_DEFAULT
    )
    clip_learning_rate_default: Annotated[
        float, Field(gt=0.0, le=C.FEDLEARN_CLIP_LEARNING_RATE_MAX, allow_inf_nan=False)
    ] = C.FEDLEARN_CLIP_LEARNING_RATE_DEFAULT
    clip_count_noise_default: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    submission_max_bytes: Annotated[int, Field(ge=1, le=C.FEDLEARN_SUBMISSION_MAX_BYTES)] = (
        C.FEDLEARN_SUBMISSION_MAX_BYTES
    )
    require_secure_aggregation: bool = False
    # The privacy budget (fedlearn/budget.py): δ of every ε this node shows and composes; the
    # composed ε per topic a join may not exceed (unset: unlimited); refuse rounds without DP.
    dp_delta: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] = (
        C.FEDLEARN_DP_DELTA_DEFAULT
    )
    dp_epsilon_budget: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    require_dp: bool = False
    auto_apply_aggregated: bool = False
    training_vram_budget_mb: Annotated[
        int, Field(ge=0, le=C.FEDLEARN_TRAINING_BUDGET_MB_CEILING)
    ] = C.FEDLEARN_TRAINING_VRAM_BUDGET_MB_DEFAULT
    training_disk_budget_mb: Annotated[
        int, Field(ge=0, le=C.FEDLEARN_TRAINING_BUDGET_MB_CEILING)
    ] = C.FEDLEARN_TRAINING_DISK_BUDGET_MB_DEFAULT

    # Reputation (fedlearn/reputation.py): a participant whose score (0..1, neutral 0.5) is
    # below the ban threshold cannot join this node's rounds; scores decay toward neutral by
    # this factor per round the node aggregates.
    reputation_ban_threshold: Annotated[float, Field(ge=0.0, lt=0.5, allow_inf_nan=False)] = 0.2
    reputation_decay: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 0.9

    # Where this node's private training text lives (`<topic>.txt|.jsonl` or `<topic>/`); unset
    # means `<data_dir>/training`. Relative paths are taken from the config file's folder.
    training_data: PathField | None = None
    # The share of this node's texts per topic held out of training to judge adapters on.
    held_out_fraction: Annotated[
        float, Field(ge=0.0, le=C.FEDLEARN_HELD_OUT_MAX_FRACTION, allow_inf_nan=False)
    ] = C.FEDLEARN_HELD_OUT_FRACTION_DEFAULT
    # `fedlearn apply --scope node` refuses an adapter whose held-out perplexity is above this
    # multiple of the base model's (1.0: it must not make this node's own text worse).
    apply_max_perplexity_ratio: Annotated[
        float, Field(gt=0.0, le=C.FEDLEARN_APPLY_MAX_PPL_RATIO_CEILING, allow_inf_nan=False)
    ] = C.FEDLEARN_APPLY_MAX_PPL_RATIO_DEFAULT

    def model_post_init(self, _context: Any) -> None:
        """Refuse a minimum number of participants above the maximum."""
        if self.min_round_participants > self.max_round_participants:
            raise ValueError("min_round_participants exceeds max_round_participants")


class NodeSection(_Section):
    """`[node]`: the node's name, where its data lives, and the network it belongs to."""

    name: Annotated[str, Field(min_length=1, max_length=C.NODE_NAME_MAX_LEN, pattern=r"^[\w.-]+$")]
    data_dir: PathField
    network_id: Annotated[
        str, Field(min_length=1, max_length=C.NETWORK_ID_MAX_LEN, pattern=r"^[\w.-]+$")
    ] = C.DEFAULT_NETWORK_ID


class ListenSection(_Section):
    """`[listen]`: the address peers dial (`wss://host:port`)."""

    host: Annotated[str, Field(min_length=1, max_length=255)] = C.DEFAULT_LISTEN_HOST
    port: Annotated[int, Field(ge=0, le=65535)] = C.DEFAULT_LISTEN_PORT


class PeerConfig(_Section):
    """A peer to dial. Its NodeID is pinned: whatever answers at the URL must be that node. Only
    `any_node = true` lets the operator accept whichever node answers there."""

    url: str
    node_id: NodeIDField | None = None
    any_node: bool = False

    @field_validator("url")
    @classmethod
    def _wss_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "wss" or not parts.hostname:
            raise ValueError(
                "must be a wss:// URL with a host (hearthnet connections are always TLS)"
            )
        if parts.port is None:
            raise ValueError("must name a port")
        return value

    @model_validator(mode="after")
    def _pinned(self) -> PeerConfig:
        if self.node_id is None and not self.any_node:
            raise ValueError(
                "names no node_id: add node_id = the peer's NodeID (`hearthnet id` on that "
                "node), or any_node = true to accept whichever node answers at the URL"
            )
        return self


class TrustSection(_Section):
    """`[trust]`: who may connect; with `members_only`, only NodeIDs in `roster`."""

    members_only: bool = False
    roster: Annotated[list[NodeIDField], Field(max_length=C.MAX_ROSTER_SIZE)] = []

    def allows(self, node_id: str) -> bool:
        """Whether a peer may connect: anyone, or only roster members when members_only."""
        return not self.members_only or node_id in self.roster


class LogSection(_Section):
    """`[log]`: structured log format and level."""

    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class ExperimentalSection(_Section):
    """`[experimental]`: feature flags; `fedlearn` gates the `experimental.fedlearn.*` namespace."""

    fedlearn: bool = False


class LLMSection(_Section):
    """`[llm]`: which base model, on which device, and whether to load its weights at start."""

    # Load the base model at start (needed to train, generate and evaluate).
    enabled: bool = False
    # A local Hugging Face model directory or a .gguf file; unset means the bundled SmolLM2.
    base_model: PathField | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Where converted models are cached (several nodes on one machine may share it); unset means
    # `<data_dir>/models`.
    cache_dir: PathField | None = None


class NodeConfig(_Section):
    """The whole validated config file: one section model per TOML table, all strict and frozen."""

    node: NodeSection
    listen: ListenSection = ListenSection()
    peers: Annotated[list[PeerConfig], Field(max_length=C.MAX_PEERS)] = []
    trust: TrustSection = TrustSection()
    log: LogSection = LogSection()
    experimental: ExperimentalSection = ExperimentalSection()
    fedlearn: FedLearnConfig = FedLearnConfig()
    llm: LLMSection = LLMSection()

    @property
    def data_dir(self) -> Path:
        """The node's data directory (absolute once loaded)."""
        return self.node.data_dir

    @property
    def key_path(self) -> Path:
        """The node's private key file inside the data directory."""
        return self.node.data_dir / C.KEY_FILE_NAME

    @property
    def features(self) -> dict[str, bool]:
        """The feature flags the capability bus gates namespaces by."""
        return {C.FEDLEARN_FEATURE: self.experimental.fedlearn}


def _describe(exc: ValidationError) -> tuple[str, list[dict[str, str]]]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown key"
        problems.append({"key": key, "reason": reason})
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"config key '{first['key']}': {first['reason']}{more}", problems


def config_from_dict(data: dict[str, Any], base_dir: Path) -> NodeConfig:
    """Validate a parsed TOML document; relative paths are taken from `base_dir`."""
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as exc:
        message, problems = _describe(exc)
        raise HearthnetError(ErrorCode.CONFIG_INVALID, message, {"problems": problems}) from None
    node = cfg.node.model_copy(update={"data_dir": (base_dir / cfg.node.data_dir).resolve()})
    updates: dict[str, Any] = {"node": node}
    llm_paths = {
        key: (base_dir / value).resolve()
        for key in ("base_model", "cache_dir")
        if (value := getattr(cfg.llm, key)) is not None
    }
    if llm_paths:
        updates["llm"] = cfg.llm.model_copy(update=llm_paths)
    if cfg.fedlearn.training_data is not None:
        updates["fedlearn"] = cfg.fedlearn.model_copy(
            update={"training_data": (base_dir / cfg.fedlearn.training_data).resolve()}
        )
    return cfg.model_copy(update=updates)


def load_config(path: Path) -> NodeConfig:
    """Read and validate a TOML config file; `config_invalid` naming the key on any problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise HearthnetError(ErrorCode.CONFIG_INVALID, f"config file {path} not found") from None
    if size > C.CONFIG_FILE_MAX_BYTES:
        raise HearthnetError(ErrorCode.CONFIG_INVALID, f"config file {path} is too large")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise HearthnetError(
            ErrorCode.CONFIG_INVALID, f"config file {path} is not valid TOML: {exc}"
        ) from None
    return config_from_dict(data, path.parent.resolve())
