from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import torch

from hearthnet.config import FedLearnConfig
from hearthnet.fedlearn.lora import expected_shapes
from hearthnet.fedlearn.manifest import RoundManifestDraft, SignedManifest
from hearthnet.identity import NodeIdentity

# A small Llama-shaped model: 2 layers, hidden 32, grouped KV (v_proj 32 -> 8).
MODEL_SHAPES = {
    f"model.layers.{i}.{name}": shape
    for i in range(2)
    for name, shape in {
        "self_attn.q_proj": (32, 32),
        "self_attn.k_proj": (8, 32),
        "self_attn.v_proj": (8, 32),
        "self_attn.o_proj": (32, 32),
        "mlp.up_proj": (64, 32),
    }.items()
}

DRAFT: dict[str, Any] = {
    "base_model_id": "tiny-llama",
    "base_model_sha": "ab" * 32,
    "lora_target_modules": ("q_proj", "v_proj"),
    "lora_rank": 4,
    "lora_alpha": 8,
    "train_steps": 10,
    "learning_rate": 1e-3,
    "batch_size": 2,
    "seed": 1234,
    "min_participants": 3,
    "max_participants": 8,
    "topic": "village-chat",
    "consent_text": "Train on your village-chat history? Only adapter weights leave this node.",
}


@pytest.fixture
def coordinator() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture
def make_manifest(coordinator: NodeIdentity) -> Callable[..., SignedManifest]:
    def make(config: FedLearnConfig | None = None, **overrides: Any) -> SignedManifest:
        fields = {**DRAFT, "deadline": datetime.now(UTC) + timedelta(hours=1), **overrides}
        draft = RoundManifestDraft(**fields)
        return draft.build(coordinator, config or FedLearnConfig())

    return make


def random_delta(
    manifest_or_signed: Any, seed: int, scale: float = 0.01, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    manifest = getattr(manifest_or_signed, "manifest", manifest_or_signed)
    gen = torch.Generator().manual_seed(seed)
    return {
        key: (torch.randn(shape, generator=gen) * scale).to(dtype)
        for key, shape in expected_shapes(manifest, MODEL_SHAPES).items()
    }
