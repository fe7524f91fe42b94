"""What a round asks of a node before it joins: the same base model and enough memory and disk.

These checks read a manifest, so they live here rather than in `LLMService`, which offers only
plain facts about its model (`base_model_sha`, `model_shapes`, `hidden_size`, `num_layers`):
`llm` imports nothing from `fedlearn` (docs/decisions.md, issue 14).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from hearthnet import constants as C
from hearthnet.config import FedLearnConfig
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.lora import target_layers
from hearthnet.fedlearn.manifest import RoundManifest


class BaseModelFacts(Protocol):
    """What the checks read from a prepared `hearthnet.llm.service.LLMService`."""

    @property
    def base_model_sha(self) -> str:
        """The prepared base model's hash, which a manifest must name."""

    @property
    def model_shapes(self) -> Mapping[str, tuple[int, int]]:
        """Each linear module's (out, in) shape: the LoRA targets and the base's size."""

    @property
    def hidden_size(self) -> int:
        """The model's hidden size, for the memory estimate of a round's training."""

    @property
    def num_layers(self) -> int:
        """The model's layer count, for the activation memory estimate."""


@dataclass(frozen=True)
class ResourceEstimate:
    """Peak memory and disk one round's training is expected to take, in MiB."""

    vram_mb: int
    disk_mb: int


def estimate_training_resources(manifest: RoundManifest, model: BaseModelFacts) -> ResourceEstimate:
    """From rank × target modules × layer shapes, plus the 4-bit base and the activations of
    one batch: a join is refused before any training starts, not after it runs out."""
    layers = target_layers(manifest, model.model_shapes)
    lora_params = sum(manifest.lora_rank * (o + i) for o, i in layers.values())
    base_params = sum(o * i for o, i in model.model_shapes.values())
    activations = (
        manifest.batch_size
        * C.TRAIN_MAX_SEQ_TOKENS
        * model.hidden_size
        * model.num_layers
        * C.TRAIN_ACTIVATION_BYTES_PER_TOKEN_UNIT
    )
    mem = base_params // 2 + lora_params * C.TRAIN_BYTES_PER_LORA_PARAM + activations
    disk = lora_params * 4 * 2  # the delta and its adapter directory
    return ResourceEstimate(vram_mb=math.ceil(mem / C.MIB), disk_mb=math.ceil(disk / C.MIB))


def check_resources(
    manifest: RoundManifest, model: BaseModelFacts, budget: FedLearnConfig
) -> ResourceEstimate:
    """The estimate, or `insufficient_resources` naming the config keys when it is over budget."""
    est = estimate_training_resources(manifest, model)
    if est.vram_mb > budget.training_vram_budget_mb or est.disk_mb > budget.training_disk_budget_mb:
        raise HearthnetError(
            ErrorCode.INSUFFICIENT_RESOURCES,
            f"training needs ~{est.vram_mb} MB memory and {est.disk_mb} MB disk; the budget "
            f"is {budget.training_vram_budget_mb} MB and "
            f"{budget.training_disk_budget_mb} MB ([fedlearn] training_vram_budget_mb "
            "and training_disk_budget_mb)",
            {"vram_mb": est.vram_mb, "disk_mb": est.disk_mb},
        )
    return est


def check_base_model(manifest: RoundManifest, model: BaseModelFacts) -> None:
    """`base_model_mismatch` unless the round trains this node's own base model (by weights
    hash): a node never downloads another model to join."""
    if manifest.base_model_sha != model.base_model_sha:
        raise HearthnetError(
            ErrorCode.BASE_MODEL_MISMATCH,
            "the round's base model differs from this node's; nothing is downloaded",
            {"local": model.base_model_sha, "round": manifest.base_model_sha},
        )
