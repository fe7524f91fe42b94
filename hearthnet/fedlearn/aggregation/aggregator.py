"""Weighted FedAvg over LoRA deltas (docs/architecture.md).

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

Robust rules (`robust.py`, chosen by `manifest.aggregation`) see what the mode averages: the
B tensors (`frozen_a`), A and B (`fedavg_ab`), or each layer's product B·A (`product_svd`,
refactored to rank r afterwards). `aggregate_audited` adds a verdict per participant — what the
rule did with its update, and its deviation from the aggregate — for the RoundResult.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.exact import (
    exact_weighted_mean,
    exact_weighted_means,
    plan_groups,
    quantize_exact,
    single_threaded,
)
from hearthnet.fedlearn.aggregation.robust import Verdict, fedavg_verdicts, run_rule
from hearthnet.fedlearn.lora import (
    A_SUFFIX,
    B_SUFFIX,
    ModelShapes,
    complete_adapter,
    expected_shapes,
    target_layers,
)
from hearthnet.fedlearn.manifest import RoundManifest
from hearthnet.fedlearn.reputation import NEUTRAL, influence
from hearthnet.fedlearn.rules.spec import RuleSpec
from hearthnet.fedlearn.submission import ParticipantSubmission, capped_weights

AdapterTensors = dict[str, torch.Tensor]


def influenced_weights(capped: Sequence[int], factors: Sequence[float]) -> list[int]:
    """capped_i × influence_i as integers for the exact kernels: scaled by one power of two so
    the largest capped claim maps to 2^20 (weights stay ≤ 2^20), rounded, at least 1."""
    top = max(capped)
    scale = 2.0 ** (20 - max(0, (top - 1).bit_length()))
    return [
        max(1, round(c * min(max(f, 0.0), 1.0) * scale))
        for c, f in zip(capped, factors, strict=True)
    ]


@dataclass(frozen=True)
class _Entry:
    submission: ParticipantSubmission
    delta: Mapping[str, torch.Tensor]


class _Aggregator:
    """Bookkeeping shared by the plain and the secure aggregator."""

    def __init__(
        self,
        manifest: RoundManifest,
        model_shapes: ModelShapes,
        influence: Mapping[str, float] | None = None,
    ):
        self.spec = RuleSpec.parse(manifest.aggregation.rule, manifest.aggregation.params)
        self.influence = dict(influence or {})
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
        """Capped num_samples; times the receipt's reputation influence when the manifest's
        rule asks for `reputation_weighted` (a participant without one counts as neutral)."""
        order = self.participants
        capped = self._capped(order)
        if self.spec.reputation_weighted:
            factors = [self.influence.get(p, influence(NEUTRAL)) for p in order]
            capped = influenced_weights(capped, factors)
        return dict(zip(order, capped, strict=True))

    def _capped(self, order: Sequence[str]) -> list[int]:
        return capped_weights([self._entries[p].submission.num_samples for p in order])

    def _check_count(self) -> None:
        if len(self._entries) < max(1, self.manifest.min_participants):
            raise HearthnetError(
                ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                f"{len(self._entries)} submissions; the round needs "
                f"{self.manifest.min_participants}",
            )

    def _complete(self, out: AdapterTensors) -> AdapterTensors:
        """A and B of every layer, sorted by key (`frozen_a`'s A derived: `complete_adapter`)."""
        return dict(sorted(complete_adapter(out, self.manifest, self.layer_shapes).items()))

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
        """The adapter alone, when the caller has no use for the audit."""
        return self.aggregate_audited()[0]

    def aggregate_audited(self) -> tuple[AdapterTensors, dict[str, Verdict]]:
        """The adapter, and per participant what the rule did and how far it deviated."""
        self._check_count()
        weight_of = self.weights()
        order = self.participants
        weights = [weight_of[p] for p in order]
        updates = _RuleInputs(self, order)
        if self.spec.robust:
            outcome = run_rule(self.spec, updates, weights)
            out = self._assemble(updates, outcome.tensors)
            verdicts = outcome.verdicts
        else:
            out = self._fedavg(order, weights)
            verdicts = fedavg_verdicts(updates, updates.outputs(out), weights)
        claimed = [self._entries[p].submission.num_samples for p in order]
        capped = self._capped(order)
        verdicts = [_note_cap(v, c, k) for v, c, k in zip(verdicts, claimed, capped, strict=True)]
        return self._check_finite(out), dict(zip(order, verdicts, strict=True))

    def _fedavg(self, order: list[str], weights: list[int]) -> AdapterTensors:
        mode = self.manifest.lora_aggregation
        out: AdapterTensors = {}
        if mode == "product_svd":
            for path in self.layers:
                mean = exact_weighted_mean(
                    self.products(path, order), weights, out_dtype=torch.float64
                )
                out[path + B_SUFFIX], out[path + A_SUFFIX] = self._factor(mean)
            return dict(sorted(out.items()))
        shapes = expected_shapes(self.manifest, self.layer_shapes)
        out.update(self._means(shapes, order, weights))
        return self._complete(out)

    def _assemble(self, updates: _RuleInputs, tensors: Sequence[torch.Tensor]) -> AdapterTensors:
        """The adapter from a rule's output per aggregated key."""
        out: AdapterTensors = {}
        for key, t in zip(updates.keys, tensors, strict=True):
            if self.manifest.lora_aggregation == "product_svd":
                out[key + B_SUFFIX], out[key + A_SUFFIX] = self._factor(t.to(torch.float64))
            else:
                out[key] = t
        return self._complete(out)

    def products(self, path: str, order: Sequence[str]) -> list[torch.Tensor]:
        """B_i·A_i of one layer for each participant, computed exactly (float64)."""
        products = []
        for p in order:
            delta = self._entries[p].delta
            bq, b_shift = quantize_exact(delta[path + B_SUFFIX], C.FEDLEARN_PRODUCT_FACTOR_BITS)
            aq, a_shift = quantize_exact(delta[path + A_SUFFIX], C.FEDLEARN_PRODUCT_FACTOR_BITS)
            # Integer entries below 2^23 and at most 64 terms: every partial sum of the matmul
            # is an exact integer below 2^52, whatever order the BLAS adds them in.
            products.append((bq @ aq) * 2.0 ** -(b_shift + a_shift))
        return products

    def _factor(self, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best rank-r factorisation B'·A' of an averaged product, as (B', A')."""
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


class _RuleInputs:
    """The aggregator's submissions as `robust.Updates`: one key per tensor the LoRA mode
    averages (B; A and B; or each layer's product B·A), participants in NodeID order."""

    def __init__(self, agg: FedAvgAggregator, order: list[str]):
        self.agg = agg
        self.order = order
        if agg.manifest.lora_aggregation == "product_svd":
            self.keys = list(agg.layers)
            self._shapes = [torch.Size(agg.layers[k]) for k in self.keys]
        else:
            shapes = expected_shapes(agg.manifest, agg.layer_shapes)
            self.keys = sorted(shapes)
            self._shapes = [torch.Size(shapes[k]) for k in self.keys]

    @property
    def n(self) -> int:
        return len(self.order)

    def shapes(self) -> list[torch.Size]:
        return list(self._shapes)

    def load(self, keys: Sequence[int]) -> list[list[torch.Tensor]]:
        if self.agg.manifest.lora_aggregation == "product_svd":
            return [self.agg.products(self.keys[k], self.order) for k in keys]
        return [[self.agg._entries[p].delta[self.keys[k]] for p in self.order] for k in keys]

    def outputs(self, adapter: AdapterTensors) -> list[torch.Tensor]:
        """An adapter in the same keys (products B·A for product_svd)."""
        if self.agg.manifest.lora_aggregation == "product_svd":
            return [
                adapter[k + B_SUFFIX].to(torch.float64) @ adapter[k + A_SUFFIX].to(torch.float64)
                for k in self.keys
            ]
        return [adapter[k] for k in self.keys]


def _note_cap(verdict: Verdict, claimed: int, capped: int) -> Verdict:
    if capped >= claimed:
        return verdict
    action = "down_weighted" if verdict.action == "kept" else verdict.action
    reason = f"num_samples capped from {claimed} to {capped}; {verdict.reason}"
    return replace(verdict, action=action, reason=reason[:256])
