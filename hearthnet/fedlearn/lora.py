"""LoRA layout shared by trainer, validator and aggregator.

A delta maps `<module path>.lora_A` (rank × in) and `<module path>.lora_B` (out × rank), where the
module path is the base model's own name for a linear layer (`model.layers.0.self_attn.q_proj`).
A layer is a target when its last path component is one of the manifest's target modules.

In `frozen_a` mode A is not trained or sent: every node derives it from the manifest seed and
the module path with ChaCha20 and single correctly-rounded IEEE operations, so it is identical
on every machine and independent of any global RNG state.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.manifest import RoundManifest

ModelShapes = Mapping[str, tuple[int, int]]  # module path -> (out_features, in_features)

A_SUFFIX = ".lora_A"
B_SUFFIX = ".lora_B"


def target_layers(manifest: RoundManifest, model_shapes: ModelShapes) -> dict[str, tuple[int, int]]:
    """The model's layers that carry LoRA in this round, sorted by path."""
    wanted = set(manifest.lora_target_modules)
    layers = {p: s for p, s in model_shapes.items() if p.rsplit(".", 1)[-1] in wanted}
    missing = wanted - {p.rsplit(".", 1)[-1] for p in layers}
    if missing:
        raise HearthnetError(
            ErrorCode.MANIFEST_INVALID,
            f"target modules not in the base model: {sorted(missing)}",
        )
    return dict(sorted(layers.items()))


def expected_shapes(
    manifest: RoundManifest, model_shapes: ModelShapes
) -> dict[str, tuple[int, int]]:
    """Exactly the tensors a participant sends: B only in `frozen_a`, A and B otherwise."""
    r = manifest.lora_rank
    out: dict[str, tuple[int, int]] = {}
    for path, (fan_out, fan_in) in target_layers(manifest, model_shapes).items():
        if manifest.lora_aggregation != "frozen_a":
            out[path + A_SUFFIX] = (r, fan_in)
        out[path + B_SUFFIX] = (fan_out, r)
    return out


def derive_lora_a(seed: int, module_path: str, rank: int, fan_in: int) -> torch.Tensor:
    """A for `frozen_a`: uniform on ±1/sqrt(fan_in) (peft's kaiming-uniform bound), float32.

    24-bit integers from a ChaCha20 stream keyed by SHA-256(seed, path) are mapped to [-1, 1)
    exactly (a power-of-two scale), then multiplied by the bound once: the same bits everywhere.
    """
    key = hashlib.sha256(
        b"hearthnet/fedlearn/frozen-a/v1\0" + seed.to_bytes(8, "big") + module_path.encode()
    ).digest()
    count = rank * fan_in
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    raw = np.frombuffer(stream.update(bytes(4 * count)), dtype="<u4") & np.uint32(0xFFFFFF)
    unit = raw.astype(np.float32) * np.float32(2.0**-23) - np.float32(1.0)  # exact
    bound = np.float32(1.0 / math.sqrt(fan_in))
    return torch.from_numpy((unit * bound).reshape(rank, fan_in))


def complete_adapter(
    delta: dict[str, torch.Tensor], manifest: RoundManifest, model_shapes: ModelShapes
) -> dict[str, torch.Tensor]:
    """A and B for every layer: in `frozen_a` the delta carries B only, and A is derived."""
    out = dict(delta)
    if manifest.lora_aggregation == "frozen_a":
        for path, (_, fan_in) in target_layers(manifest, model_shapes).items():
            out[path + A_SUFFIX] = derive_lora_a(manifest.seed, path, manifest.lora_rank, fan_in)
    return out
