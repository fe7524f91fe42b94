"""Secure aggregation by pairwise additive masking (docs/architecture.md).

Each participant makes a fresh X25519 key for the round and announces it signed by its node key
together with its claimed num_samples. For every pair (i, j) both sides derive the same 32-byte
key with HKDF-SHA256 over their X25519 secret, bound to the round, the manifest and the two
NodeIDs, and expand it with ChaCha20 into a mask over Z/2^64. A participant clips its delta,
quantises it (FEDLEARN_SECURE_FRACTION_BITS steps per clip_norm), multiplies by its capped
weight, appends the weight, and adds the masks it shares with higher NodeIDs and subtracts those
with lower ones. Alone, a masked vector is uniform over the ring; summed over every announced
participant the masks cancel, leaving Σ w_i·q_i and Σ w_i exactly.

Quantisation bound: each value is off by at most half a step, so the secure mean differs from the
plain weighted mean of the clipped deltas by at most clip_norm·2^-(FRACTION_BITS+1) per entry
(plus the final float32 rounding).

Threat model: an honest-but-curious coordinator and participants. Masks cancel only if every
announced participant submits; recovery from a drop-out after the key exchange (Bonawitz et al.'s
secret-shared seeds) is not implemented, so such a round fails with
`fedlearn_aggregation_failed` instead of revealing anything.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from safetensors import SafetensorError
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.aggregator import AdapterTensors, _Aggregator
from hearthnet.fedlearn.delta import canonical_safetensors, read_header
from hearthnet.fedlearn.lora import ModelShapes, expected_shapes
from hearthnet.fedlearn.manifest import RoundManifest
from hearthnet.fedlearn.masks import MaskingKey, MaskKeyAnnouncement, check_roster, roster_weights
from hearthnet.fedlearn.privacy import clip_gradient
from hearthnet.fedlearn.submission import ParticipantSubmission

_STEPS = 2**C.FEDLEARN_SECURE_FRACTION_BITS


def layout(manifest: RoundManifest, model_shapes: ModelShapes) -> list[tuple[str, tuple[int, int]]]:
    """The masked vector's order: the delta's keys sorted, flattened row-major, then the weight."""
    return sorted(expected_shapes(manifest, model_shapes).items())


def masked_length(manifest: RoundManifest, model_shapes: ModelShapes) -> int:
    """Entries of a masked vector: every delta value, then the weight."""
    return sum(a * b for _, (a, b) in layout(manifest, model_shapes)) + 1


def _mask_stream(key: bytes, count: int, zeros: bytes, out: bytearray) -> np.ndarray:
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream.update_into(zeros, out)
    return np.frombuffer(out, dtype="<u8", count=count)


def mask_delta(
    delta: Mapping[str, torch.Tensor],
    key: MaskingKey,
    me: str,
    announcements: Mapping[str, MaskKeyAnnouncement],
    manifest: RoundManifest,
    manifest_sha: str,
    model_shapes: ModelShapes,
) -> np.ndarray:
    """The participant's masked vector (uint64, length P + 1) for the announced roster."""
    check_roster(announcements, manifest, manifest_sha)
    if me not in announcements or announcements[me].public_key != key.public_key.hex():
        raise HearthnetError(ErrorCode.FEDLEARN_AGGREGATION_FAILED, "not in the mask roster")
    weight = roster_weights(announcements)[me]
    clipped = clip_gradient(delta, manifest.clip_norm)
    parts = [
        clipped[k].to(torch.float64).reshape(-1).numpy() for k, _ in layout(manifest, model_shapes)
    ]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    q = np.rint(flat * (_STEPS / manifest.clip_norm))
    np.clip(q, -_STEPS, _STEPS, out=q)
    vec = np.empty(flat.size + 1, dtype=np.int64)
    np.multiply(q, weight, out=vec[:-1], casting="unsafe")
    vec[-1] = weight
    masked = vec.view(np.uint64)
    zeros, buf = bytes(8 * vec.size), bytearray(8 * vec.size + 16)
    for peer in sorted(announcements):
        if peer == me:
            continue
        mask = _mask_stream(key.pairwise_key(me, announcements[peer]), vec.size, zeros, buf)
        if me < peer:
            masked += mask  # uint64 arithmetic wraps modulo 2^64
        else:
            masked -= mask
    return masked


def serialize_masked(
    vec: np.ndarray, *, manifest_sha: str, round_id: str, participant: str
) -> bytes:
    """A participant's masked vector as canonical safetensors, bound to the manifest, round and
    participant."""
    return canonical_safetensors(
        np_save(
            {"masked": vec},
            {
                "format": C.FEDLEARN_MASKED_FORMAT,
                "manifest_sha": manifest_sha,
                "round_id": round_id,
                "participant": participant,
            },
        )
    )


def deserialize_masked(
    data: bytes, length: int, max_bytes: int = C.FEDLEARN_SUBMISSION_MAX_BYTES
) -> tuple[np.ndarray, dict[str, str]]:
    """Parse a masked vector of `length` u64 entries; `delta_invalid` for anything else."""
    header, metadata = read_header(data, max_bytes, allowed_dtypes=frozenset({"U64"}))
    if metadata.get("format") != C.FEDLEARN_MASKED_FORMAT or set(header) != {"masked"}:
        raise HearthnetError(ErrorCode.DELTA_INVALID, "not a hearthnet masked vector")
    if header["masked"].get("shape") != [length]:
        raise HearthnetError(
            ErrorCode.DELTA_INVALID, f"masked vector must have {length} entries", {"key": "masked"}
        )
    try:
        vec = np_load(data)["masked"]
    except (SafetensorError, ValueError) as exc:
        raise HearthnetError(ErrorCode.DELTA_INVALID, f"masked vector unreadable: {exc}") from None
    return vec, metadata


def read_masked(path: Path, length: int) -> np.ndarray:
    """A stored masked vector that `deserialize_masked` accepted at submission, streamed from
    the blob store without parsing it again: one tensor of `length` U64 entries, so its data
    is the file's last 8·length bytes. A file of any other size is `delta_invalid`."""
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if n < 0 or path.stat().st_size != 8 + n + 8 * length:
            raise HearthnetError(
                ErrorCode.DELTA_INVALID, f"masked vector must have {length} entries"
            )
        fh.seek(8 + n)
        vec = np.fromfile(fh, dtype="<u8", count=length)
    return vec.astype(np.uint64, copy=False)


class SecureFedAvgAggregator(_Aggregator):
    """Sums masked vectors as they arrive; sees only the total, never one participant's delta."""

    def __init__(
        self,
        manifest: RoundManifest,
        model_shapes: ModelShapes,
        announcements: Mapping[str, MaskKeyAnnouncement],
        manifest_sha: str,
        mask_scheme: Literal["additive_pairwise"] = "additive_pairwise",
    ):
        if mask_scheme != "additive_pairwise":
            raise HearthnetError(ErrorCode.MANIFEST_INVALID, f"unknown mask scheme {mask_scheme}")
        if not manifest.secure:
            raise HearthnetError(ErrorCode.MANIFEST_INVALID, "the manifest is not secure")
        super().__init__(manifest, model_shapes)
        check_roster(announcements, manifest, manifest_sha)
        self.announcements = dict(announcements)
        self._layout = layout(manifest, model_shapes)
        self.length = masked_length(manifest, model_shapes)
        self._sum = np.zeros(self.length, dtype=np.uint64)

    def add(self, submission: ParticipantSubmission, masked: np.ndarray) -> None:
        """Add one participant's masked vector to the running sum, after checking it announced a
        key with this weight and the vector's shape."""
        if submission.participant not in self.announcements:
            raise HearthnetError(ErrorCode.DELTA_INVALID, "participant did not announce a mask key")
        if submission.num_samples != self.announcements[submission.participant].num_samples:
            raise HearthnetError(
                ErrorCode.DELTA_INVALID, "num_samples differs from the announcement"
            )
        if masked.dtype != np.uint64 or masked.shape != (self.length,):
            raise HearthnetError(
                ErrorCode.DELTA_INVALID, "masked vector has the wrong shape", {"key": "masked"}
            )
        self._admit(submission, {})
        self._sum += masked

    def aggregate(self) -> AdapterTensors:
        """Unmask the sum into the adapter; `fedlearn_aggregation_failed` unless every announced
        participant submitted, since otherwise the masks do not cancel."""
        missing = sorted(set(self.announcements) - set(self.participants))
        if missing:
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                f"{len(missing)} announced participants did not submit; masks cannot cancel",
                {"missing": missing},
            )
        self._check_count()
        total = self._sum.view(np.int64)
        expected = sum(roster_weights(self.announcements).values())
        if int(total[-1]) != expected:
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                "unmasked weight total does not match the roster",
            )
        # One masked input is uniform mod 2^64 and cannot be range-checked, but the total can:
        # an honest quantised entry is within ±_STEPS × its weight, so the sum is within
        # ±_STEPS × the roster's total weight (docs/decisions.md, issue 13).
        bound = np.int64(min(_STEPS * expected, 2**63 - 1))
        values = total[:-1]
        if values.size and (bool((values > bound).any()) or bool((values < -bound).any())):
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                "the masked inputs are out of range: a participant submitted values beyond "
                "the clip bound",
            )
        mean = total[:-1].astype(np.float64) / float(expected) * (self.manifest.clip_norm / _STEPS)
        out: AdapterTensors = {}
        offset = 0
        for name, shape in self._layout:
            size = shape[0] * shape[1]
            out[name] = torch.from_numpy(
                mean[offset : offset + size].reshape(shape).astype(np.float32)
            )
            offset += size
        return self._check_finite(self._complete(out))
