"""LoRA deltas on the wire and on disk (docs/architecture.md).

A delta is a safetensors file (no pickle, dtype and shape preserved) whose metadata names the
round, the participant and the manifest SHA. Untrusted bytes are size-checked before parsing,
the header is parsed with the strict JSON parser, and `validate_delta` checks that the tensors
are exactly the LoRA state dict the manifest asks for. Every violation is `delta_invalid` with a
detail naming the key.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hearthnet import constants as C
from hearthnet.canonical import canonical_bytes, parse_json
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.lora import ModelShapes, expected_shapes
from hearthnet.fedlearn.manifest import RoundManifest

ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ALLOWED_HEADER_DTYPES = frozenset({"F32", "F16", "BF16"})

Delta = Mapping[str, torch.Tensor]


def _invalid(message: str, key: str | None = None) -> HearthnetError:
    return HearthnetError(ErrorCode.DELTA_INVALID, message, {"key": key} if key else None)


def canonical_safetensors(raw: bytes) -> bytes:
    """Rewrite a safetensors header as canonical JSON (JCS), padded to 8 bytes.

    safetensors writes `__metadata__` from a Rust HashMap whose order changes from call to call,
    so the same tensors would hash differently. Data offsets are relative to the data section,
    which is kept byte for byte.
    """
    (n,) = struct.unpack("<Q", raw[:8])
    header = parse_json(raw[8 : 8 + n], C.DELTA_HEADER_MAX_BYTES)
    text = canonical_bytes(header)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def serialize_delta(delta: Delta, *, manifest_sha: str, round_id: str, participant: str) -> bytes:
    """A delta as canonical safetensors bound to its manifest, round and participant, so the
    same tensors always give the same bytes (and hash) and the bytes name the round they are for."""
    metadata = {
        "format": C.FEDLEARN_DELTA_FORMAT,
        "manifest_sha": manifest_sha,
        "round_id": round_id,
        "participant": participant,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(delta.items())}
    return canonical_safetensors(st_save(tensors, metadata))


def read_header(
    data: bytes, max_bytes: int, allowed_dtypes: frozenset[str] = _ALLOWED_HEADER_DTYPES
) -> tuple[dict[str, Any], dict[str, str]]:
    """The safetensors header (tensor entries, metadata) of untrusted bytes, strictly parsed."""
    if len(data) > max_bytes:
        raise _invalid(f"delta of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < 8:
        raise _invalid("delta is too short to be safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > C.DELTA_HEADER_MAX_BYTES or 8 + n > len(data):
        raise _invalid("delta header length is out of bounds")
    try:
        header = parse_json(data[8 : 8 + n], C.DELTA_HEADER_MAX_BYTES)
    except HearthnetError as exc:
        raise _invalid(f"delta header is not valid JSON: {exc.message}") from None
    if not isinstance(header, dict):
        raise _invalid("delta header is not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _invalid("delta metadata is malformed")
    if len(header) > C.DELTA_MAX_TENSORS:
        raise _invalid("delta holds too many tensors")
    for key, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in allowed_dtypes:
            raise _invalid(
                f"tensor dtype is not allowed ({', '.join(sorted(allowed_dtypes))})", key
            )
    return header, metadata


def deserialize_delta(
    data: bytes, max_bytes: int = C.FEDLEARN_SUBMISSION_MAX_BYTES
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata from untrusted bytes; never unpickles anything."""
    _, metadata = read_header(data, max_bytes)
    if metadata.get("format") != C.FEDLEARN_DELTA_FORMAT:
        raise _invalid("not a hearthnet delta (metadata format)")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _invalid(f"delta is not valid safetensors: {exc}") from None
    return tensors, metadata


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _tensor_spans(
    header: Mapping[str, Any], data_len: int
) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """(dtype, shape, begin, end) per tensor, every span inside the data and of exact size."""
    spans = {}
    for key, entry in header.items():
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise _invalid("tensor entry is malformed", key)
        dtype = _TORCH_DTYPES[entry["dtype"]]
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        if not 0 <= begin <= end <= data_len or end - begin != count * dtype.itemsize:
            raise _invalid("tensor data offsets are out of bounds", key)
        spans[key] = (dtype, tuple(shape), begin, end)
    return spans


class LazyDelta(Mapping[str, torch.Tensor]):
    """A delta file read one tensor at a time, so aggregation streams from the blob store.

    The header is parsed with the same strict parser as `deserialize_delta`, every tensor's
    byte span is checked against the file, and a tensor read is exactly its bytes (`pread`):
    memory holds only the tensors in use, never a mapping of the whole file.
    """

    def __init__(self, path: Path, max_bytes: int = C.FEDLEARN_SUBMISSION_MAX_BYTES):
        self._path = Path(path)
        size = self._path.stat().st_size
        if size > max_bytes:
            raise _invalid(f"delta of {size} bytes exceeds the limit of {max_bytes}")
        with open(self._path, "rb") as fh:
            prefix = fh.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            if n > C.DELTA_HEADER_MAX_BYTES:
                raise _invalid("delta header length is out of bounds")
            head = prefix + fh.read(n)
        header, self.metadata = read_header(head, max_bytes)
        if self.metadata.get("format") != C.FEDLEARN_DELTA_FORMAT:
            raise _invalid("not a hearthnet delta (metadata format)")
        self._data_start = 8 + n
        self._spans = _tensor_spans(header, size - self._data_start)

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._spans[key]
        fd = os.open(self._path, os.O_RDONLY)
        try:
            data = bytearray(end - begin)
            view = memoryview(data)
            got = 0
            while got < len(data):
                chunk = os.preadv(fd, [view[got:]], self._data_start + begin + got)
                if chunk <= 0:
                    raise _invalid("delta file is truncated", key)
                got += chunk
        finally:
            os.close(fd)
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._spans))

    def __len__(self) -> int:
        return len(self._spans)


def validate_delta(
    delta: Delta,
    manifest: RoundManifest,
    model_shapes: ModelShapes,
    size: int | None = None,
    max_bytes: int = C.FEDLEARN_SUBMISSION_MAX_BYTES,
) -> None:
    """Exactly the expected keys, shapes for this rank and model, allowed dtypes, all finite."""
    if size is not None and size > max_bytes:
        raise _invalid(f"delta of {size} bytes exceeds the limit of {max_bytes}")
    expected = expected_shapes(manifest, model_shapes)
    missing = sorted(set(expected) - set(delta))
    if missing:
        raise _invalid(f"missing tensor for a target module ({len(missing)} missing)", missing[0])
    extra = sorted(set(delta) - set(expected))
    if extra:
        raise _invalid("unexpected tensor", extra[0])
    for key, shape in expected.items():
        tensor = delta[key]
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in ALLOWED_DTYPES:
            raise _invalid("tensor dtype is not allowed (float32, float16, bfloat16)", key)
        if tuple(tensor.shape) != shape:
            raise _invalid(f"shape {tuple(tensor.shape)} != expected {shape}", key)
        if not bool(torch.isfinite(tensor).all()):
            raise _invalid("tensor has NaN or Inf values", key)
