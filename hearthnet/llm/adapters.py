"""LoRA adapters on disk as standard PEFT directories.

hearthnet names LoRA tensors `<module path>.lora_A|lora_B` (see fedlearn/lora.py); PEFT saves
them as `base_model.model.<module path>.lora_A.weight`. `write_peft_adapter` turns an aggregated
adapter into a directory that stock `peft.PeftModel.from_pretrained(base, dir)` loads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.delta import canonical_safetensors
from hearthnet.fedlearn.lora import A_SUFFIX, B_SUFFIX
from hearthnet.fedlearn.manifest import RoundManifest

PEFT_PREFIX = "base_model.model."


def to_peft_key(key: str) -> str:
    for suffix in (A_SUFFIX, B_SUFFIX):
        if key.endswith(suffix):
            return f"{PEFT_PREFIX}{key}.weight"
    raise HearthnetError(ErrorCode.DELTA_INVALID, "not a LoRA tensor name", {"key": key})


def from_peft_key(key: str) -> str:
    """PEFT's `base_model.model.X.lora_A[.default].weight` → hearthnet's `X.lora_A`."""
    name = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
    for part in (".lora_A", ".lora_B"):
        head, sep, tail = name.partition(part)
        if sep and tail in ("", ".default"):
            return head + part
    raise HearthnetError(ErrorCode.DELTA_INVALID, "not a LoRA tensor name", {"key": key[:128]})


def write_peft_adapter(
    tensors: Mapping[str, torch.Tensor],
    manifest: RoundManifest,
    base_model: str,
    target: Path,
) -> Path:
    """Write `tensors` (A and B of every layer) as a PEFT adapter directory, atomically."""
    from peft import LoraConfig
    from safetensors.torch import save

    if target.is_dir() and (target / "adapter_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".adapter-"))
    try:
        LoraConfig(
            r=manifest.lora_rank,
            lora_alpha=manifest.lora_alpha,
            lora_dropout=manifest.lora_dropout,
            target_modules=list(manifest.lora_target_modules),
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model,
        ).save_pretrained(str(tmp))
        data = {
            to_peft_key(k): v.detach().contiguous().to(torch.float32) for k, v in tensors.items()
        }
        (tmp / "adapter_model.safetensors").write_bytes(canonical_safetensors(save(data)))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
