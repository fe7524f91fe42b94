"""LoRA adapters on disk as standard PEFT directories.

hearthnet names LoRA tensors `<module path>.lora_A|lora_B` (see fedlearn/lora.py); PEFT saves
them as `base_model.model.<module path>.lora_A.weight`. `write_peft_adapter` turns an aggregated
adapter into a directory that stock `peft.PeftModel.from_pretrained(base, dir)` loads, which is
all `LLMService` needs: it takes a directory and knows nothing of rounds or manifests, so `llm`
imports nothing from `fedlearn` (docs/decisions.md, issue 14).
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
    """hearthnet's `X.lora_A` → PEFT's `base_model.model.X.lora_A.weight`."""
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
    """Write `tensors` (A and B of every layer) as a PEFT adapter directory, atomically (a
    reader finds a complete directory or, for an instant while one is replaced, none; never a
    mix of two).

    An existing `target` is kept only when it holds byte for byte what would be written (the
    canonical safetensors and the config); anything else there — another adapter written to a
    reused path, a damaged file — is replaced, so the directory always serves `tensors`."""
    from peft import LoraConfig
    from safetensors.torch import save

    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(target.parent, 0o700)  # adapters are the node's own; nobody else reads them
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
        if _same_files(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _same_files(fresh: Path, existing: Path) -> bool:
    """`existing` is a directory with exactly `fresh`'s files, byte for byte."""
    if not existing.is_dir():
        return False
    names = sorted(p.name for p in fresh.iterdir())
    if sorted(p.name for p in existing.iterdir()) != names:
        return False
    return all(
        (existing / n).is_file() and (existing / n).read_bytes() == (fresh / n).read_bytes()
        for n in names
    )


def _swap_in(tmp: Path, target: Path) -> None:
    """Move `tmp` to `target`; an old `target` is renamed aside first (a directory cannot be
    renamed over a non-empty one) and removed after, or put back if the move fails."""
    if not target.exists() and not target.is_symlink():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=".adapter-old-"))
    aside = old / "previous"
    os.replace(target, aside)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(aside, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)  # with the old target in it, on success
