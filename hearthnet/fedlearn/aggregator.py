"""Weighted FedAvg over LoRA deltas (spec M28 §4.5, §5.5; DESIGN.md §4).

Deterministic: participants are taken in NodeID order and every mean is computed exactly
(`exact.py`), so the same submissions give the same bytes on any node. Streaming: tensors are
pulled key by key from each participant's delta mapping (which may be a lazy view of a blob), so
memory grows with participants × the largest tensor, not × the whole adapter.

LoRA modes (`manifest.lora_aggregation`):
- `frozen_a`: A is derived from the seed (identical everywhere) and only B is averaged; since
  every participant shares A, mean(B)·A = mean(B·A) exactly.
- `product_svd`: the products B·A are averaged exactly, then truncated back to rank r by SVD
  (float64 LAPACK pinned to one thread; reproducible for the same torch build and CPU ISA).
- `fedavg_ab`: A and B averaged separately — biased, kept for comparison.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.delta import ParticipantSubmission
from hearthnet.fedlearn.exact import (
    exact_weighted_mean,
    exact_weighted_means,
    plan_groups,
    quantize_exact,
    single_threaded,
)
from hearthnet.fedlearn.lora import (
    A_SUFFIX,
    B_SUFFIX,
    ModelShapes,
    derive_lora_a,
    expected_shapes,
    target_layers,
)
from hearthnet.fedlearn.manifest import RoundManifest

AdapterTensors = dict[str, torch.Tensor]
SUPPORTED_RULES = frozenset({"fedavg"})


def capped_weights(num_samples: Sequence[int]) -> list[int]:
    """Each claim capped at FEDLEARN_MAX_NUM_SAMPLES and at FEDLEARN_WEIGHT_MEDIAN_CAP × the
    lower median claim: a participant inflating its count gains at most that factor."""
    if not num_samples or any(n < 1 for n in num_samples):
        raise HearthnetError(ErrorCode.FEDLEARN_AGGREGATION_FAILED, "num_samples must be >= 1")
    cap = min(
        C.FEDLEARN_MAX_NUM_SAMPLES,
        C.FEDLEARN_WEIGHT_MEDIAN_CAP * statistics.median_low(num_samples),
    )
    return [min(n, cap) for n in num_samples]


@dataclass(frozen=True)
class _Entry:
    submission: ParticipantSubmission
    delta: Mapping[str, torch.Tensor]


class _Aggregator:
    """Bookkeeping shared by the plain and the secure aggregator."""

    def __init__(self, manifest: RoundManifest, model_shapes: ModelShapes):
        if manifest.aggregation.rule not in SUPPORTED_RULES:
            raise HearthnetError(
                ErrorCode.MANIFEST_INVALID,
                f"unknown aggregation rule {manifest.aggregation.rule!r}",
            )
        self.manifest = manifest
        self.layers = target_layers(manifest, model_shapes)
        self.layer_shapes = model_shapes
        self._entries: dict[str, _Entry] = {}

    def _admit(self, submission: ParticipantSubmission, delta: Mapping[str, torch.Tensor]) -> None:
        if submission.round_id != self.manifest.round_id:
            raise HearthnetError(ErrorCode.DELTA_INVALID, "submission is for another round")
        if submission.participant in self._entries:
            raise HearthnetError(ErrorCode.DELTA_INVALID, "participant already submitted")
        self._entries[submission.participant] = _Entry(submission, delta)

    @property
    def participants(self) -> list[str]:
        return sorted(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def weights(self) -> dict[str, int]:
        order = self.participants
        capped = capped_weights([self._entries[p].submission.num_samples for p in order])
        return dict(zip(order, capped, strict=True))

    def _check_count(self) -> None:
        if len(self._entries) < max(1, self.manifest.min_participants):
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                f"{len(self._entries)} submissions; the round needs "
                f"{self.manifest.min_participants}",
            )

    def _frozen_a(self, path: str) -> torch.Tensor:
        _, fan_in = self.layers[path]
        return derive_lora_a(self.manifest.seed, path, self.manifest.lora_rank, fan_in)

    @staticmethod
    def _check_finite(out: AdapterTensors) -> AdapterTensors:
        for key, tensor in out.items():
            if not bool(torch.isfinite(tensor).all()):
                raise HearthnetError(
                    ErrorCode.FEDLEARN_AGGREGATION_FAILED, "aggregate is not finite", {"key": key}
                )
        return out


class FedAvgAggregator(_Aggregator):
    """Collects validated deltas and returns the weighted average adapter (A and B per layer)."""

    def add(self, submission: ParticipantSubmission, delta: Mapping[str, torch.Tensor]) -> None:
        """`delta` must already have passed `validate_delta` for this manifest."""
        self._admit(submission, delta)

    def _means(
        self, shapes: dict[str, tuple[int, int]], order: list[str], weights: list[int]
    ) -> AdapterTensors:
        """Exact means of every key, loading one block of small keys (or one large key) at a
        time: memory holds participants × one block, never whole deltas."""
        keys = list(shapes)
        out: AdapterTensors = {}
        for group in plan_groups([a * b for a, b in shapes.values()]):
            columns = [[self._entries[p].delta[keys[i]] for p in order] for i in group]
            for i, mean in zip(group, exact_weighted_means(columns, weights), strict=True):
                out[keys[i]] = mean
            del columns  # before the next block loads, or two blocks are alive at once
        return out

    def aggregate(self) -> AdapterTensors:
        self._check_count()
        weight_of = self.weights()
        order = self.participants
        weights = [weight_of[p] for p in order]
        mode = self.manifest.lora_aggregation
        out: AdapterTensors = {}
        if mode == "product_svd":
            for path in self.layers:
                b, a = self._product_svd(path, order, weights)
                out[path + A_SUFFIX], out[path + B_SUFFIX] = a, b
            return self._check_finite(out)
        shapes = expected_shapes(self.manifest, self.layer_shapes)
        out.update(self._means(shapes, order, weights))
        if mode == "frozen_a":
            for path in self.layers:
                out[path + A_SUFFIX] = self._frozen_a(path)
        return self._check_finite(dict(sorted(out.items())))

    def _product_svd(
        self, path: str, order: list[str], weights: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean of B_i·A_i, then the best rank-r factorisation B'·A' of it."""
        products = []
        for p in order:
            delta = self._entries[p].delta
            bq, b_shift = quantize_exact(delta[path + B_SUFFIX], C.FEDLEARN_PRODUCT_FACTOR_BITS)
            aq, a_shift = quantize_exact(delta[path + A_SUFFIX], C.FEDLEARN_PRODUCT_FACTOR_BITS)
            # Integer entries below 2^23 and at most 64 terms: every partial sum of the matmul
            # is an exact integer below 2^52, whatever order the BLAS adds them in.
            products.append((bq @ aq) * 2.0 ** -(b_shift + a_shift))
        mean = exact_weighted_mean(products, weights, out_dtype=torch.float64)
        r = self.manifest.lora_rank
        with single_threaded():
            u, s, vh = torch.linalg.svd(mean, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r, :]
        # Sign convention: each left singular vector's largest-|entry| (first on ties) is > 0.
        pivot = u.abs().argmax(dim=0)
        signs = torch.sign(u[pivot, torch.arange(u.shape[1])])
        signs[signs == 0] = 1.0
        u, vh = u * signs, vh * signs[:, None]
        root = s.sqrt()
        return (u * root).to(torch.float32), (root[:, None] * vh).to(torch.float32)
