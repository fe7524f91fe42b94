"""Secure aggregation by double masking, SecAgg+ (docs/architecture.md, "Secure rounds").

Each participant clips its delta, quantises it (FEDLEARN_SECURE_FRACTION_BITS steps per
clip_norm), multiplies by its capped weight, appends the weight, and adds over Z/2^64 its self
mask (ChaCha20 keyed by its self-mask seed) and, for each neighbour in the share set U2 (the
neighbour graph of `secagg_graph.py`), the pairwise mask both derive from their X25519 keys
(added towards higher NodeIDs, subtracted towards lower). Alone, a masked vector is uniform over
the ring. The coordinator sums the survivors' vectors, removes each survivor's self mask (its
seed recovered from its neighbours' shares, `secagg.py`) and the pairwise masks the survivors
share with members that dropped after sending their shares (those members' mask keys
recovered); the pairwise masks between survivors cancel. What is left is Σ w_i·q_i and Σ w_i
over the survivors exactly, per group (bucket) of the graph.

Quantisation bound: each value is off by at most half a step, so the secure mean differs from the
plain weighted mean of the survivors' clipped deltas by at most clip_norm·2^-(FRACTION_BITS+1)
per entry (plus the final float32 rounding).

Threat model: up to the manifest's `secagg_dropout` of the roster may drop after the key
exchange; a coordinator, even with up to `secagg_corruption` of the roster colluding, learns
no member's update, only the sums of groups with at least two survivors.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors import SafetensorError
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.aggregator import AdapterTensors, _Aggregator
from hearthnet.fedlearn.aggregation.robust import run_rule
from hearthnet.fedlearn.aggregation.robust_ops import TensorUpdates
from hearthnet.fedlearn.delta import canonical_safetensors, read_header
from hearthnet.fedlearn.lora import ModelShapes, expected_shapes
from hearthnet.fedlearn.manifest import RoundManifest
from hearthnet.fedlearn.masks import (
    MaskingKey,
    check_roster,
    pairwise_key,
    roster_weights,
)
from hearthnet.fedlearn.privacy import clip_gradient
from hearthnet.fedlearn.rules.spec import RuleSpec
from hearthnet.fedlearn.secagg import SecAggRound, Unmasked
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


def self_mask_key(seed: bytes, round_id: str) -> bytes:
    """The ChaCha20 key of a self mask: HKDF of the seed, so it can never equal a pairwise key."""
    info = b"hearthnet/fedlearn/self-mask-stream/v1\0" + round_id.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)


class _Streams:
    """One reusable zero buffer and output buffer for mask streams of `count` u64 entries."""

    def __init__(self, count: int):
        self.count = count
        self.zeros = bytes(8 * count)
        self.buf = bytearray(8 * count + 16)

    def mask(self, key: bytes) -> np.ndarray:
        return _mask_stream(key, self.count, self.zeros, self.buf)


def mask_delta(
    delta: Mapping[str, torch.Tensor],
    key: MaskingKey,
    me: str,
    plan: SecAggRound,
    shared: Sequence[str],
    manifest: RoundManifest,
    model_shapes: ModelShapes,
) -> np.ndarray:
    """The participant's masked vector (uint64, length P + 1): its self mask and the pairwise
    masks of its neighbours in the share set `shared` (U2)."""
    announcements = plan.announcements
    check_roster(announcements, manifest, plan.manifest_sha)
    if me not in announcements or announcements[me].public_key != key.public_key.hex():
        raise HearthnetError(ErrorCode.FEDLEARN_AGGREGATION_FAILED, "not in the mask roster")
    if me not in shared:
        raise HearthnetError(
            ErrorCode.FEDLEARN_AGGREGATION_FAILED, "this node's shares did not reach the round"
        )
    if len(set(plan.neighbours[me]) & set(shared)) < plan.threshold(me):
        raise HearthnetError(  # Bonawitz et al.'s |U2| ≥ t: fewer could not hold its secrets
            ErrorCode.FEDLEARN_AGGREGATION_FAILED,
            "too few of this node's neighbours sent shares to mask with",
        )
    in_u2 = set(shared)
    peers = [p for p in plan.neighbours[me] if p in in_u2]
    return masked_vector(delta, key, me, plan, peers, manifest, model_shapes)


def masked_vector(
    delta: Mapping[str, torch.Tensor],
    key: MaskingKey,
    me: str,
    plan: SecAggRound,
    peers: Sequence[str],
    manifest: RoundManifest,
    model_shapes: ModelShapes,
) -> np.ndarray:
    """The arithmetic of `mask_delta` without its checks: clip, quantise, weigh, add the self
    mask and the pairwise masks towards `peers` (the benchmark masks towards a subset: the
    survivors' pairwise masks cancel in their sum)."""
    announcements = plan.announcements
    weight = roster_weights(announcements)[me]
    if not all(bool(torch.isfinite(t).all()) for t in delta.values()):
        raise HearthnetError(  # NaN would quantise to the lowest int64 and sink the round
            ErrorCode.DELTA_INVALID, "the trained delta is not finite: nothing to mask"
        )
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
    streams = _Streams(vec.size)
    masked += streams.mask(self_mask_key(key.self_seed, plan.round_id))  # wraps modulo 2^64
    for peer in peers:
        mask = streams.mask(key.pairwise_key(me, announcements[peer]))
        if me < peer:
            masked += mask
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
    """Sums masked vectors as they arrive, per group; sees only the unmasked group totals,
    never one participant's delta."""

    def __init__(
        self,
        manifest: RoundManifest,
        model_shapes: ModelShapes,
        plan: SecAggRound,
        shared: Sequence[str],
    ):
        if not manifest.secure:
            raise HearthnetError(ErrorCode.MANIFEST_INVALID, "the manifest is not secure")
        super().__init__(manifest, model_shapes)
        check_roster(plan.announcements, manifest, plan.manifest_sha)
        self.plan = plan
        self.shared = frozenset(shared)
        self.announcements = dict(plan.announcements)
        self._layout = layout(manifest, model_shapes)
        self.length = masked_length(manifest, model_shapes)
        self._sums = [np.zeros(self.length, dtype=np.uint64) for _ in plan.groups]
        self.refused_groups: list[str] = []  # buckets left out as out of range
        self._group = {p: i for i, g in enumerate(plan.groups) for p in g}

    def add(self, submission: ParticipantSubmission, masked: np.ndarray) -> None:
        """Add one participant's masked vector to its group's running sum, after checking it
        sent its shares, announced a key with this weight and the vector's shape."""
        if submission.participant not in self.shared:
            raise HearthnetError(ErrorCode.DELTA_INVALID, "participant is not in the share set")
        if submission.num_samples != self.announcements[submission.participant].num_samples:
            raise HearthnetError(
                ErrorCode.DELTA_INVALID, "num_samples differs from the announcement"
            )
        if masked.dtype != np.uint64 or masked.shape != (self.length,):
            raise HearthnetError(
                ErrorCode.DELTA_INVALID, "masked vector has the wrong shape", {"key": "masked"}
            )
        self._admit(submission, {})
        self._sums[self._group[submission.participant]] += masked

    def group_totals(self, unmasked: Unmasked) -> list[np.ndarray]:
        """Each group's Σ w_i·q_i and Σ w_i (int64; a group without survivors is absent): the
        survivors' self masks and their pairwise masks with dropped members removed."""
        req = unmasked.request
        survivors = set(req.survivors)
        if survivors != set(self.participants):
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                "the unmask request's survivors are not the submissions summed",
            )
        streams = _Streams(self.length)
        sums = [s.copy() for s in self._sums]
        for owner in req.survivors:
            seed = unmasked.self_seeds[owner]
            sums[self._group[owner]] -= streams.mask(self_mask_key(seed, self.plan.round_id))
        for dropped in unmasked.mask_keys:
            private = X25519PrivateKey.from_private_bytes(unmasked.mask_keys[dropped])
            for peer in self.plan.neighbours[dropped]:
                if peer not in survivors:
                    continue
                pair = pairwise_key(private, dropped, self.announcements[peer])
                if peer < dropped:  # the survivor added this mask
                    sums[self._group[peer]] -= streams.mask(pair)
                else:
                    sums[self._group[peer]] += streams.mask(pair)
        weights = roster_weights(self.announcements)
        out = []
        self.refused_groups = []
        buckets = len(self.plan.groups) > 1
        for i, group in enumerate(self.plan.groups):
            alive = [p for p in group if p in survivors]
            if not alive:
                continue
            total = sums[i].view(np.int64)
            try:
                self._check_total(total, sum(weights[p] for p in alive))
            except HearthnetError as err:
                if not buckets:
                    raise
                # one bucket out of range: a member in it sent values beyond the clip bound;
                # the rule runs over the other buckets (and refuses if too few are left)
                self.refused_groups.append(err.message)
                continue
            out.append(total)
        return out

    def _check_total(self, total: np.ndarray, expected: int) -> None:
        if int(total[-1]) != expected:
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                "unmasked weight total does not match the roster",
            )
        # One masked input is uniform mod 2^64 and cannot be range-checked, but the total can:
        # an honest quantised entry is within ±_STEPS × its weight, so the sum is within
        # ±_STEPS × the survivors' total weight (docs/decisions.md, issue 13).
        bound = np.int64(min(_STEPS * expected, 2**63 - 1))
        values = total[:-1]
        if values.size and (bool((values > bound).any()) or bool((values < -bound).any())):
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                "the masked inputs are out of range: a participant submitted values beyond "
                "the clip bound",
            )
        # and the clip is an L2 bound: each honest ‖q_i‖ ≤ _STEPS plus half a step of rounding
        # per entry, so ‖Σ w_i·q_i‖ ≤ Σ w_i·(_STEPS + ½·√P). A member pushing every entry to
        # its per-entry limit is refused here (docs/decisions.md, issue 15).
        norm = float(np.linalg.norm(values.astype(np.float64)))
        if norm > expected * (_STEPS + 0.5 * math.sqrt(values.size)):
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                "the masked inputs are out of range: their sum is longer than the clip bound "
                "allows (a participant submitted a vector beyond clip_norm)",
            )

    def mean_of(self, total: np.ndarray) -> np.ndarray:
        """An unmasked total (Σ w·q, then Σ w) as its weighted mean, float64 in layout order."""
        scale = self.manifest.clip_norm / _STEPS / float(total[-1])
        mean: np.ndarray = total[:-1].astype(np.float64) * scale
        return mean

    def to_tensors(self, mean: np.ndarray) -> AdapterTensors:
        """A vector in layout order as the adapter's tensors (float32)."""
        out: AdapterTensors = {}
        offset = 0
        for name, shape in self._layout:
            size = shape[0] * shape[1]
            out[name] = torch.from_numpy(
                mean[offset : offset + size].reshape(shape).astype(np.float32)
            )
            offset += size
        return out

    def aggregate(self, unmasked: Unmasked) -> AdapterTensors:
        """The survivors' weighted mean (fedavg over every group's total); with a robust rule,
        the rule over the bucket means (each bucket weighted by its total weight)."""
        self._check_count()
        totals = self.group_totals(unmasked)
        m = self.manifest
        spec = RuleSpec.parse(m.aggregation.rule, m.aggregation.params)
        if spec.robust:
            weights = [int(t[-1]) for t in totals]
            params = dict(m.aggregation.params)
            if self.refused_groups and isinstance(params.get("f"), int):
                # a bucket caught out of range is out; the rule need only hold the rest
                params["f"] = max(0, int(params["f"]) - len(self.refused_groups))
                spec = RuleSpec.parse(m.aggregation.rule, params)
            spec.check(len(totals), weights)
            means = [torch.from_numpy(self.mean_of(t)) for t in totals]
            vec = run_rule(spec, TensorUpdates(means), weights, audit=False).tensors[0]
            return self._check_finite(self._complete(self.to_tensors(vec.numpy())))
        whole = np.zeros(self.length, dtype=np.uint64)
        for t in totals:
            whole += t.view(np.uint64)  # wraps like the masked sums; the total is range-checked
        mean = self.mean_of(whole.view(np.int64))
        return self._check_finite(self._complete(self.to_tensors(mean)))
