"""bitsandbytes' CPU weight packing, made exactly reversible.

On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a `Linear4bit`'s 4-bit weight into a
blocked layout the first time the layer runs an inference forward (eval mode, no grad), and turns
its block scales (`absmax`) into a transposed bfloat16 table. Any later `state_dict()` read — peft
wrapping the model, loading an adapter, saving, hashing — first undoes the packing through
bitsandbytes' `_convert_weight_packed_for_cpu_inverse`. That restores the weight bits but, for
plain (non-nested) statistics, leaves `absmax` transposed and in bfloat16: every block then
dequantises with another block's scale, and the base model is ruined for good (SmolLM2's loss on
a held-out notice: 4.73 before, 19.6 after a single `state_dict()`). A machine without the CPU
feature never takes that path, which is why it went unseen.

`guard_cpu_packing(model)`, called by `load_4bit` before the model has run anything, keeps the
packed path where it pays (inference) and makes every way out of it exact: it remembers each
layer's original scales and the SHA-256 of its weight bytes, and registers a state-dict pre-hook
that restores the layer before bitsandbytes' own `_save_to_state_dict` runs — the weight bits
through bitsandbytes' inverse (a pure permutation, checked against the SHA), the scales from the
record. The next inference forward packs again from the exact original, so a used model gives the
same numbers as a freshly loaded one, in any order of calls. See docs/decisions.md.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from hearthnet.errors import ErrorCode, HearthnetError

_RECORD = "_hearthnet_unpacked"


class _NoHubKernelNotice(logging.Filter):
    """Drops bitsandbytes' import-time notice that it could not fetch a CPU kernel through the
    `kernels` package. That package downloads kernels from a model hub, which a node never
    contacts (and `kernels` is not installed); bitsandbytes then uses the kernel it ships, which
    is what every hearthnet node is meant to run. Any other bitsandbytes message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelNotice())


@dataclass(frozen=True)
class _Unpacked:
    """What bitsandbytes' packing replaces and its inverse does not give back."""

    weight_sha: str
    absmax: torch.Tensor
    dtype: torch.dtype
    nested: bool
    offset: Any
    state2: Any


def _linear4bit_modules(model: Any) -> list[Any]:
    from bitsandbytes.nn.modules import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def _packed(module: Any) -> bool:
    state = getattr(module.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _sha(weight: torch.Tensor) -> str:
    data = weight.detach().contiguous().view(torch.uint8).cpu()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def cpu_packing_supported() -> bool:
    """Whether bitsandbytes takes its packed CPU path on this machine (AVX512-BF16)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def cpu_features() -> dict[str, Any]:
    """The CPU facts that pick dependencies' code paths: torch's kernel level, whether
    bitsandbytes packs 4-bit weights here, and the relevant /proc/cpuinfo flags (Linux)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bitsandbytes_cpu_packing": cpu_packing_supported(),
        "flags": [f for f in wanted if f in flags],
    }


def packed_layers(model: Any) -> int:
    """How many 4-bit layers are in the packed CPU layout right now."""
    return sum(_packed(m) for m in _linear4bit_modules(model))


def _restore(module: Any, *_args: Any) -> None:
    """State-dict pre-hook: put a packed layer back exactly as it was loaded."""
    if not _packed(module):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    record: _Unpacked = getattr(module, _RECORD)
    # bitsandbytes' inverse rewrites the state it is given: hand it a copy, so that a layout it
    # cannot invert leaves the layer packed (and still correct) rather than half restored.
    data, _ = _convert_weight_packed_for_cpu_inverse(
        module.weight.data, copy.copy(module.weight.quant_state)
    )
    if _sha(data) != record.weight_sha:
        raise HearthnetError(
            ErrorCode.MODEL_UNAVAILABLE,
            "bitsandbytes' CPU weight packing did not invert exactly; the installed bitsandbytes "
            "differs from the locked one (reinstall with scripts/_setup)",
        )
    state = module.weight.quant_state
    state.absmax = record.absmax
    state.dtype = record.dtype
    state.nested = record.nested
    state.offset = record.offset
    state.state2 = record.state2
    setattr(state, "packing_format_for_cpu", False)  # noqa: B010 (not declared on QuantState)
    module.weight.data = data


def guard_cpu_packing(model: Any) -> int:
    """Record every 4-bit layer's original state and restore it before any state-dict read.

    Must run before the model's first forward; returns the number of layers guarded."""
    layers = _linear4bit_modules(model)
    for module in layers:
        if hasattr(module, _RECORD):
            continue
        if _packed(module):
            raise HearthnetError(
                ErrorCode.MODEL_UNAVAILABLE,
                "guard_cpu_packing needs a model that has not run yet (a layer is packed)",
            )
        state = module.weight.quant_state
        record = _Unpacked(
            weight_sha=_sha(module.weight.data),
            absmax=state.absmax,
            dtype=state.dtype,
            nested=bool(state.nested),
            offset=getattr(state, "offset", None),
            state2=getattr(state, "state2", None),
        )
        setattr(module, _RECORD, record)
        module.register_state_dict_pre_hook(_restore)
    return len(layers)


def unpack(model: Any) -> None:
    """Restore every packed layer now (what any state-dict read does through the guard)."""
    for module in _linear4bit_modules(model):
        _restore(module)


def pack_as_inference(model: Any) -> int:
    """Pack every 4-bit layer as bitsandbytes' first inference forward does on an AVX512-BF16
    CPU. The conversion is plain torch, so this drives that path on any CPU (tests, benchmarks);
    only the packed matmul itself needs the CPU feature. Returns the number of layers packed."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    count = 0
    for module in _linear4bit_modules(model):
        if not _packed(module):
            data, state = _convert_weight_packed_for_cpu(
                module.weight.data, module.weight.quant_state
            )
            module.weight.data = data
            module.weight.quant_state = state
            count += 1
    return count


def set_cpu_packing(model: Any, enabled: bool) -> None:
    """Let (or stop) bitsandbytes pack layers on their next inference forward; stopping also
    unpacks what is packed. Enabling is refused where the CPU lacks AVX512-BF16: bitsandbytes
    registers the packed matmul only there."""
    if enabled and not cpu_packing_supported():
        raise HearthnetError(
            ErrorCode.MODEL_UNAVAILABLE, "this CPU has no AVX512-BF16: no packed 4-bit path"
        )
    if not enabled:
        unpack(model)
    for module in _linear4bit_modules(model):
        module.support_avx512bf16_for_cpu = enabled
