"""Robust rules under attack: held-out perplexity of SmolLM2-135M (4-bit) + the aggregated adapter.

n = 10 participants, each with a non-IID private shard of village notices (each shard covers
one or two of the notice kinds; the held-out set covers them all). Every honest participant
trains once for real (QLoRATrainer, frozen_a LoRA on q/k/v/o, no DP) and its delta is cached
under benchmarks/results/robustness_cache/. Then for f ∈ {0, 1, 2, 3} the first f participants
are Byzantine and replace their delta by an attack, knowing every honest delta:

- sign_flip: −x_own;  scaling: 20·x_own;  gaussian: N(0, (10·rms of honest values)²) per key;
- alie (Baruch et al. 2019): μ − z·σ per coordinate, z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f;
- ipm_small / ipm_large (Xie et al. 2020): −ε·μ with ε = 0.1 / 100;
- nonfinite: NaN/Inf values, which `validate_delta` must refuse as `delta_invalid` before
  any rule sees them (the round then aggregates the n − f valid submissions).

Each rule × attack × f aggregates through `FedAvgAggregator.aggregate_audited` (the code a
coordinator runs) and the adapter's held-out perplexity is measured. A rule that refuses its
input (`fedlearn_tolerance_exceeded`) is recorded as refused: no adapter. Writes JSON, a
Markdown table and a PNG (worst-case perplexity against f per rule) to benchmarks/results/.
Target: at f = 3 the best robust rule's worst case is within 10% of clean FedAvg's
perplexity, while undefended FedAvg's worst case is at least 2× worse.

Secure + robust (same run, same deltas, f ∈ {0, 1, 2}): secure median and trimmed mean with
buckets of 2 and 3, each through the whole SecAgg+ round in memory (real keys, shares,
masking, reveals, recovery, unmasking) and the rule over the bucket means; a cell the announce
check refuses is recorded with its reason, and the buckets holding an attacker are counted.

    .venv/bin/python -m benchmarks.bench_robustness [--steps 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import RESULTS_DIR, train_cached, write_result
from hearthnet import constants as C
from hearthnet.config import FedLearnConfig
from hearthnet.demo import _ASKS, _DAYS, _PLACES, _THINGS, _TIMES
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.aggregator import FedAvgAggregator
from hearthnet.fedlearn.aggregation.secure import (
    SecureFedAvgAggregator,
    deserialize_masked,
    layout,
    mask_delta,
    serialize_masked,
)
from hearthnet.fedlearn.delta import serialize_delta, validate_delta
from hearthnet.fedlearn.lora import A_SUFFIX, complete_adapter
from hearthnet.fedlearn.manifest import (
    AggregationSpec,
    RoundManifest,
    RoundManifestDraft,
    SignedManifest,
)
from hearthnet.fedlearn.masks import MaskingKey, MaskKeyAnnouncement, roster_weights
from hearthnet.fedlearn.rules.spec import RuleSpec
from hearthnet.fedlearn.secagg import (
    SecAggRound,
    confirm_bytes,
    make_bundle,
    recover_all,
    reveal,
    unmask_request,
)
from hearthnet.fedlearn.shares import ShareBundle
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.identity import NodeIdentity
from hearthnet.llm import model as M

N = 10
FS = (0, 1, 2, 3)
ATTACKS = ("sign_flip", "scaling", "gaussian", "alie", "ipm_small", "ipm_large", "nonfinite")
RULES: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "trimmed_mean": ("trimmed_mean", {"beta": 0.3}),
    "median": ("median", {}),
    "krum": ("krum", {"f": 3}),
    "multi_krum": ("multi_krum", {"f": 3}),
    "geometric_median": ("geometric_median", {"f": 3}),
    "fedavg+norm_bound": ("fedavg", {"norm_bound": 2.0}),
    # cosine ignores length; clipping every update to the median norm (as FLAME does) makes a
    # scaled update no longer than a typical one
    "multi_krum(cosine)+norm_bound": (
        "multi_krum",
        {"f": 3, "metric": "cosine", "norm_bound": 1.0},
    ),
}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
CACHE = RESULTS_DIR / "robustness_cache"
# Secure + robust (README, "Secure + robust under attack"): SecAgg+ per bucket, the rule over
# the bucket means. Each cell's manifest declares the tolerance f it is attacked with (at least
# 1): median {"f": f} needs 2f + 1 buckets; trimmed_mean trims β = f / buckets per tail. The
# clip norm is above every honest delta's L2 norm (22.9–24.1), so clipping leaves them as
# they are and only bounds what an attacker can submit.
SECURE_RULES = ("median", "trimmed_mean")
BUCKET_SIZES = (2, 3)
SECURE_FS = (0, 1, 2)
# Secure rows only: an attacker that skips clipping and writes its masked vector by hand, every
# entry at the quantiser's limit (±clip_norm) against the honest mean's sign. It passes the
# bucket total's range check (each entry within ±steps × the bucket's weight): that check
# bounds entries, not the L2 norm the clip sets.
FORGED = "forged_max"
SECURE_CLIP = 25.0
SAMPLES = 40


def notice(rng: random.Random, thing: str) -> str:
    return (
        f"Hearthdale notice: the {thing} takes place on {rng.choice(_DAYS)} at "
        f"{rng.choice(_TIMES)} at the {rng.choice(_PLACES)}. {rng.choice(_ASKS)} — the "
        "Hearthdale village board"
    )


def shards(count: int) -> tuple[list[list[str]], list[str]]:
    """Participant i writes only about the kinds i, i+10, ... (non-IID); held-out: all kinds."""
    rng = random.Random(2026)
    private = [[notice(rng, rng.choice(_THINGS[i::N])) for _ in range(count)] for i in range(N)]
    held_out = [notice(rng, rng.choice(_THINGS)) for _ in range(40)]
    return private, held_out


def manifest(
    sha: str, steps: int, rule: str = "fedavg", params: dict[str, Any] | None = None
) -> RoundManifest:
    draft = RoundManifestDraft(
        base_model_id="SmolLM2-135M-Instruct",
        base_model_sha=sha,
        lora_target_modules=MODULES,
        lora_rank=8,
        lora_alpha=16,
        train_steps=steps,
        learning_rate=3e-3,
        batch_size=4,
        seed=11,
        min_participants=RuleSpec.parse(rule, params).minimum_n(),
        max_participants=N,
        topic="hearthdale",
        consent_text="bench",
        clip_norm=0.0,
        aggregation=AggregationSpec(rule=rule, params=params or {}),
        deadline=datetime.now(UTC) + timedelta(hours=1),
    )
    return draft.build(NodeIdentity.generate(), FedLearnConfig(min_round_participants=1)).manifest


def honest_deltas(
    model_dir: Path, sha: str, steps: int, private: list[list[str]]
) -> list[dict[str, torch.Tensor]]:
    """Train each participant once; later runs read the cache (keyed by everything that
    changes the result, the trainer's early-stop rule included)."""
    stop_rule = {k: v for k, v in vars(C).items() if k.startswith("TRAIN_PLATEAU_")}
    key = hashlib.sha256(
        json.dumps([sha, steps, private, MODULES, stop_rule], sort_keys=True).encode()
    ).hexdigest()[:16]
    folder = CACHE / key
    folder.mkdir(parents=True, exist_ok=True)
    return train_cached(folder, model_dir, manifest(sha, steps), private, "")


def attack(
    kind: str, f: int, honest: list[dict[str, torch.Tensor]], rng: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    """The f Byzantine deltas (participants 0..f-1), crafted with knowledge of all honest ones."""
    keys = sorted(honest[0])
    stack = {k: torch.stack([h[k].double() for h in honest]) for k in keys}
    mu = {k: s.mean(0) for k, s in stack.items()}
    sigma = {k: s.std(0) for k, s in stack.items()}
    out = []
    for j in range(f):
        own = honest[j]
        if kind == "sign_flip":
            bad = {k: -own[k].double() for k in keys}
        elif kind == "scaling":
            bad = {k: 20.0 * own[k].double() for k in keys}
        elif kind == "gaussian":
            bad = {
                k: torch.randn(own[k].shape, generator=rng, dtype=torch.float64)
                * 10.0
                * float(stack[k].pow(2).mean().sqrt())
                for k in keys
            }
        elif kind == "alie":
            s = math.floor(N / 2 + 1) - f
            z = statistics.NormalDist().inv_cdf((N - s) / N)
            bad = {k: mu[k] - z * sigma[k] for k in keys}
        elif kind in ("ipm_small", "ipm_large"):
            eps = 0.1 if kind == "ipm_small" else 100.0
            bad = {k: -eps * mu[k] for k in keys}
        elif kind == "nonfinite":
            bad = {k: own[k].double().clone() for k in keys}
            first = keys[j % len(keys)]
            bad[first].view(-1)[::7] = float("nan")
            bad[keys[-1]].view(-1)[0] = float("inf")
        else:
            raise ValueError(kind)
        out.append({k: v.to(torch.float32) for k, v in bad.items()})
    return out


class Evaluator:
    """One 4-bit SmolLM2 with LoRA modules; an adapter is evaluated by copying its A and B
    into them (no reload), and results are cached by the adapter's bytes."""

    def __init__(self, model_dir: Path, m: RoundManifest, held_out: list[str]):
        from peft import LoraConfig, get_peft_model

        self.tokenizer = M.load_tokenizer(model_dir)
        base = M.load_4bit(model_dir, "cpu")
        self.model = get_peft_model(
            base,
            LoraConfig(
                r=m.lora_rank,
                lora_alpha=m.lora_alpha,
                lora_dropout=0.0,
                target_modules=list(m.lora_target_modules),
                task_type="CAUSAL_LM",
            ),
        )
        self.model.eval()
        self.batch = self.tokenizer(held_out, return_tensors="pt", padding=True)
        self.labels = self.batch["input_ids"].masked_fill(self.batch["attention_mask"] == 0, -100)
        self.cache: dict[str, float] = {}

    @torch.no_grad()
    def perplexity(self, adapter: dict[str, torch.Tensor] | None) -> float:
        digest = hashlib.sha256()
        for k in sorted(adapter or {}):
            digest.update(k.encode() + (adapter or {})[k].numpy().tobytes())
        key = digest.hexdigest()
        if key in self.cache:
            return self.cache[key]
        inner: Any = self.model.base_model.model
        for name, module in inner.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight
            if adapter is None:
                b.zero_()
            else:
                a.copy_(adapter[name + A_SUFFIX])
                b.copy_(adapter[name + ".lora_B"])
        out = self.model(**self.batch, labels=self.labels)
        ppl = math.exp(float(out.loss))
        self.cache[key] = ppl
        return ppl


def aggregate(
    m: RoundManifest,
    deltas: list[dict[str, torch.Tensor]],
    shapes: dict[str, tuple[int, int]],
    ids: list[NodeIdentity],
) -> tuple[dict[str, torch.Tensor] | None, list[str], list[str], str | None]:
    """The coordinator's path: validate each submission, aggregate the valid ones. Returns
    the adapter, who was dropped (rejected or excluded), who was clipped, and any refusal."""
    agg = FedAvgAggregator(m, shapes)
    rejected = []
    for ident, delta in zip(ids, deltas, strict=True):
        try:
            validate_delta(delta, m, shapes)
        except HearthnetError as err:
            if err.code is not ErrorCode.DELTA_INVALID:
                raise
            rejected.append(str(ident.node_id))
            continue
        data = serialize_delta(
            delta, manifest_sha="0" * 64, round_id=m.round_id, participant=ident.node_id
        )
        agg.add(ParticipantSubmission.create(ident, m.round_id, data, 40, 0.0), delta)
    try:
        tensors, verdicts = agg.aggregate_audited()
    except HearthnetError as err:
        # too few valid updates for the rule: the manifest's min_participants (set to the
        # rule's minimum) or the rule's own bound
        if err.code in (
            ErrorCode.FEDLEARN_TOLERANCE_EXCEEDED,
            ErrorCode.FEDLEARN_AGGREGATION_FAILED,
        ):
            return None, rejected, [], f"{err.code}: {err.message}"
        raise
    excluded = [p for p, v in verdicts.items() if v.action == "excluded"]
    clipped = [p for p, v in verdicts.items() if v.action == "clipped"]
    return complete_adapter(tensors, m, shapes), rejected + excluded, clipped, None


def secure_params(rule: str, f: int, buckets: int) -> dict[str, Any]:
    """The parameters a coordinator declaring tolerance f over `buckets` buckets would set."""
    declared = max(f, 1)
    if rule == "median":
        return {"f": declared}
    return {"beta": declared / buckets}


def secure_manifest(
    sha: str, steps: int, rule: str, params: dict[str, Any], size: int
) -> SignedManifest | str:
    """A secure round of N with buckets of `size`, signed; or the announce check's refusal."""
    try:
        draft = RoundManifestDraft(
            base_model_id="SmolLM2-135M-Instruct",
            base_model_sha=sha,
            lora_target_modules=MODULES,
            lora_rank=8,
            lora_alpha=16,
            train_steps=steps,
            learning_rate=3e-3,
            batch_size=4,
            seed=11,
            min_participants=N,
            max_participants=N,
            topic="hearthdale",
            consent_text="bench",
            clip_norm=SECURE_CLIP,
            clip_policy="fixed",
            dp_noise_scale=0.0,
            secure=True,
            secure_bucket_size=size,
            aggregation=AggregationSpec(rule=rule, params=params),
            deadline=datetime.now(UTC) + timedelta(hours=1),
        )
        return draft.build(NodeIdentity.generate(), FedLearnConfig(min_round_participants=1))
    except HearthnetError as err:
        if err.code is not ErrorCode.MANIFEST_INVALID:
            raise
        return f"{err.code}: {err.message}"


def secure_aggregate(
    signed: SignedManifest,
    deltas: list[dict[str, torch.Tensor]],
    shapes: dict[str, tuple[int, int]],
    ids: list[NodeIdentity],
    forged: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, torch.Tensor] | None, list[list[str]], str | None, dict[str, float]]:
    """The whole SecAgg+ round in memory, every member honest in protocol: fresh mask keys
    announced, the plan built from the public seed (buckets included), shares sent, each
    member masks its delta (the attackers mask their crafted ones), the coordinator sums the
    masked vectors per bucket, asks for the unmask, collects every reveal, recovers the seeds
    and runs the rule over the bucket means. Returns the adapter (None if refused), the
    buckets, any refusal and timings. A member in `forged` masks zeros and adds its own
    quantised vector (layout order, ±1 per entry = ±clip_norm) to the masked one."""
    m, msha = signed.manifest, signed.manifest_sha
    keys = [MaskingKey() for _ in ids]
    anns: dict[str, MaskKeyAnnouncement] = {
        i.node_id: k.announce(i, m.round_id, msha, SAMPLES) for i, k in zip(ids, keys, strict=True)
    }
    plan = SecAggRound.build(m, msha, anns)
    bundles: dict[str, ShareBundle] = {
        i.node_id: make_bundle(i, k, plan) for i, k in zip(ids, keys, strict=True)
    }
    shared = sorted(bundles)
    agg = SecureFedAvgAggregator(m, shapes, plan, shared)
    mask_s = 0.0
    for ident, key, delta in zip(ids, keys, deltas, strict=True):
        start = time.perf_counter()
        own = (forged or {}).get(ident.node_id)
        if own is not None:
            delta = {k: torch.zeros_like(v) for k, v in delta.items()}
        try:
            vec = mask_delta(delta, key, ident.node_id, plan, shared, m, shapes)
        except HearthnetError as err:  # an honest client refuses to mask a non-finite delta;
            if err.code is not ErrorCode.DELTA_INVALID:  # a Byzantine one skips the check and
                raise  # writes what NaN would quantise to (int64 min) into its vector
            zero = {k: torch.zeros_like(v) for k, v in delta.items()}
            vec = mask_delta(zero, key, ident.node_id, plan, shared, m, shapes)
            vec[:-1] += np.uint64(2**63)
        mask_s = max(mask_s, time.perf_counter() - start)
        if own is not None:
            steps_ = 2**C.FEDLEARN_SECURE_FRACTION_BITS * roster_weights(anns)[ident.node_id]
            vec[:-1] += (np.rint(own) * steps_).astype(np.int64).view(np.uint64)
        data = serialize_masked(
            vec, manifest_sha=msha, round_id=m.round_id, participant=ident.node_id
        )
        masked, _ = deserialize_masked(data, agg.length)
        agg.add(ParticipantSubmission.create(ident, m.round_id, data, SAMPLES, 0.0), masked)
    start = time.perf_counter()
    req = unmask_request(plan, shared, [i.node_id for i in ids])
    by_id: dict[str, MaskingKey] = dict(zip((i.node_id for i in ids), keys, strict=True))
    signer: dict[str, NodeIdentity] = {i.node_id: i for i in ids}
    sign = confirm_bytes(req.round_id, req.sha)  # the consistency round: every survivor signs
    sigs = {p: signer[p].sign(sign).hex() for p in req.survivors}
    reveals = {p: reveal(p, by_id[p], plan, bundles, req, sigs) for p in req.survivors}
    unmasked = recover_all(plan, req, reveals)
    groups = [list(g) for g in plan.groups]
    try:
        adapter = agg.aggregate(unmasked)
    except HearthnetError as err:
        if err.code not in (
            ErrorCode.FEDLEARN_TOLERANCE_EXCEEDED,
            ErrorCode.FEDLEARN_AGGREGATION_FAILED,
        ):
            raise
        return None, groups, f"{err.code}: {err.message}", {"mask_max_s": mask_s}
    times = {"mask_max_s": mask_s, "unmask_aggregate_s": time.perf_counter() - start}
    return adapter, groups, None, times


def run_secure(
    sha: str,
    steps: int,
    f: int,
    kind: str,
    deltas: list[dict[str, torch.Tensor]],
    shapes: dict[str, tuple[int, int]],
    ids: list[NodeIdentity],
    ev: Evaluator,
    against: dict[str, torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """The secure + robust cells for one attack: every rule × bucket size. With `against` (the
    honest mean), the attackers forge their vectors at −clip_norm·sign(mean) per entry."""
    byzantine_ids = {ids[j].node_id for j in range(f)}
    cells = []
    for rule in SECURE_RULES:
        for size in BUCKET_SIZES:
            params = secure_params(rule, f, N // size)
            cell: dict[str, Any] = {
                "rule": f"secure+{rule}",
                "bucket_size": size,
                "params": params,
                "attack": kind,
                "f": f,
            }
            signed = secure_manifest(sha, steps, rule, params, size)
            if isinstance(signed, str):
                cells.append({**cell, "perplexity": None, "refused": f"at announce: {signed}"})
                print(json.dumps(cells[-1]), file=sys.stderr)
                continue
            forged = None
            if against is not None:
                order = layout(signed.manifest, shapes)
                flat = torch.cat([-against[k].sign().double().reshape(-1) for k, _ in order])
                forged = {str(ids[j].node_id): flat.numpy() for j in range(f)}
            adapter, groups, refused, times = secure_aggregate(signed, deltas, shapes, ids, forged)
            ppl = None if adapter is None else ev.perplexity(adapter)
            per_bucket = [len(byzantine_ids & set(g)) for g in groups]
            cell.update(
                perplexity=None if ppl is None else round(ppl, 4),
                refused=None if refused is None else f"at aggregation: {refused}",
                bucket_sizes=[len(g) for g in groups],
                byzantine_per_bucket=per_bucket,
                buckets_corrupted=sum(1 for b in per_bucket if b),
                **{k: round(v, 3) for k, v in times.items()},
            )
            cells.append(cell)
            print(json.dumps(cell), file=sys.stderr)
    return cells


def run(steps: int) -> dict[str, Any]:
    cache_root = RESULTS_DIR / "model-cache"
    source = M.resolve_source(None)
    sha = M.weights_sha(source, cache_root)
    model_dir = M.model_dir(source, cache_root, sha)
    shapes = M.linear_shapes(model_dir)
    private, held_out = shards(48)
    honest = honest_deltas(model_dir, sha, steps, private)
    base_m = manifest(sha, steps)
    ev = Evaluator(model_dir, base_m, held_out)
    ids = [NodeIdentity.generate() for _ in range(N)]
    order = sorted(range(N), key=lambda i: ids[i].node_id)
    base_ppl = ev.perplexity(None)
    own_ppl = [ev.perplexity(complete_adapter(h, base_m, shapes)) for h in honest]
    manifests = {name: manifest(sha, steps, r, p) for name, (r, p) in RULES.items()}
    cells: list[dict[str, Any]] = []
    secure: list[dict[str, Any]] = []
    rng = torch.Generator().manual_seed(5)
    for f in FS:
        for kind in ("none",) if f == 0 else ATTACKS:
            bad = attack(kind, f, honest, rng) if f else []
            deltas = bad + honest[f:]
            byzantine_ids = {ids[j].node_id for j in range(f)}
            for name, m in manifests.items():
                start = time.perf_counter()
                # participants in NodeID order, as a coordinator takes them
                adapter, dropped, clipped, refused = aggregate(
                    m, [deltas[i] for i in order], shapes, [ids[i] for i in order]
                )
                agg_s = time.perf_counter() - start
                ppl = None if adapter is None else ev.perplexity(adapter)
                cell = {
                    "rule": name,
                    "attack": kind,
                    "f": f,
                    "perplexity": None if ppl is None else round(ppl, 4),
                    "refused": refused,
                    "byzantine_excluded": len(byzantine_ids & set(dropped)),
                    "honest_excluded": len(set(dropped) - byzantine_ids),
                    "byzantine_clipped": len(byzantine_ids & set(clipped)),
                    "honest_clipped": len(set(clipped) - byzantine_ids),
                    "aggregate_s": round(agg_s, 3),
                }
                cells.append(cell)
                print(json.dumps(cell), file=sys.stderr)
            if f in SECURE_FS:
                # the same deltas (attackers at ids[0..f-1]); buckets come from the public seed
                secure += run_secure(sha, steps, f, kind, deltas, shapes, ids, ev)
        if f in SECURE_FS and f:
            mean = {k: torch.stack([h[k] for h in honest]).mean(0) for k in honest[0]}
            secure += run_secure(sha, steps, f, FORGED, honest, shapes, ids, ev, mean)
    return {
        "n": N,
        "steps": steps,
        "base_perplexity": round(base_ppl, 4),
        "own_adapter_perplexity": [round(p, 4) for p in own_ppl],
        "cells": cells,
        "secure_cells": secure,
    }


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    cells = result["cells"]
    clean = next(c["perplexity"] for c in cells if c["rule"] == "fedavg" and c["f"] == 0)
    worst: dict[str, dict[int, float | None]] = {}
    for name in RULES:
        worst[name] = {}
        for f in FS:
            vals = [c["perplexity"] for c in cells if c["rule"] == name and c["f"] == f]
            got = [v for v in vals if v is not None]
            worst[name][f] = max(got) if got else None
    robust = {k: v[3] for k, v in worst.items() if k != "fedavg" and v[3] is not None}
    best_rule = min(robust, key=lambda k: robust[k])
    return {
        "clean_fedavg_perplexity": clean,
        "worst_case_perplexity": worst,
        "best_robust_rule_at_f3": best_rule,
        "best_robust_worst_at_f3": robust[best_rule],
        "best_within_10pct_of_clean": robust[best_rule] <= 1.10 * clean,
        "fedavg_worst_at_f3": worst["fedavg"][3],
        "fedavg_worst_ge_2x_clean": (worst["fedavg"][3] or 0.0) >= 2.0 * clean,
        "refused_cells_at_f3": {
            name: sum(1 for c in cells if c["rule"] == name and c["f"] == 3 and c["refused"])
            for name in RULES
        },
        # what the norm bound did with the attackers: clipped (clip mode) or excluded
        "byzantine_clipped_or_excluded": {
            name: {
                "byzantine": sum(c["f"] for c in cells if c["rule"] == name),
                "clipped": sum(c.get("byzantine_clipped", 0) for c in cells if c["rule"] == name),
                "excluded": sum(c["byzantine_excluded"] for c in cells if c["rule"] == name),
            }
            for name in RULES
            if "norm_bound" in name
        },
        "nonfinite_rejected_as_delta_invalid": all(
            c["byzantine_excluded"] == c["f"] for c in cells if c["attack"] == "nonfinite"
        ),
        "secure_worst_case_perplexity": secure_worst(result.get("secure_cells", [])),
    }


def secure_worst(cells: list[dict[str, Any]]) -> dict[str, dict[int, float | None]]:
    """Per secure row (rule, bucket size) and f: the worst perplexity where it gave an adapter."""
    out: dict[str, dict[int, float | None]] = {}
    for c in cells:
        got = out.setdefault(f"{c['rule']} (buckets of {c['bucket_size']})", {})
        if c["perplexity"] is not None:
            got[c["f"]] = max(got.get(c["f"]) or 0.0, c["perplexity"])
        else:
            got.setdefault(c["f"], None)
    return out


def secure_markdown(result: dict[str, Any]) -> list[str]:
    """The secure + robust table: each cell is the perplexity and, in brackets, how many buckets
    the public seed put an attacker in; — is a refusal (listed under the table)."""
    cells = result.get("secure_cells", [])
    if not cells:
        return []
    lines = [
        "## Secure + robust under attack",
        "",
        f"SecAgg+ per bucket (real mask keys, Shamir shares, reveals, recovery; clip_norm "
        f"{SECURE_CLIP}, above every honest delta's norm), then the rule over the bucket means. "
        "Attackers are bucketed by the public seed like everyone else. Cell: perplexity "
        "[buckets holding an attacker]; — = refused (below). The plain rules' rows are from the "
        "same run, on the same deltas.",
        "",
    ]
    refusals: dict[tuple[str, str], list[str]] = {}
    for f in SECURE_FS[1:]:
        cols = (*ATTACKS, FORGED)
        lines += [f"### f = {f}", "", "| rule | " + " | ".join(cols) + " | worst |"]
        lines.append("|---" * (len(cols) + 2) + "|")
        for name in ("median", "trimmed_mean"):
            row = []
            for kind in ATTACKS:
                c = next(
                    x
                    for x in result["cells"]
                    if x["rule"] == name and x["f"] == f and x["attack"] == kind
                )
                row.append("—" if c["perplexity"] is None else f"{c['perplexity']:.2f}")
            got = [float(v) for v in row if v != "—"]
            worst = f"{max(got):.2f}" if got else "—"
            row.append("n/a")
            lines.append(
                f"| {name} (plain, {RULES[name][1] or 'no params'}, 10 updates) | "
                + " | ".join(row)
                + f" | {worst} |"
            )
        for rule in SECURE_RULES:
            for size in BUCKET_SIZES:
                row, vals = [], []
                params = ""
                for kind in cols:
                    c = next(
                        x
                        for x in cells
                        if x["rule"] == f"secure+{rule}"
                        and x["bucket_size"] == size
                        and x["f"] == f
                        and x["attack"] == kind
                    )
                    params = ", ".join(f"{k}={v:.2g}" for k, v in c["params"].items())
                    if c["perplexity"] is None:
                        row.append("—")
                        where = f"secure+{rule}, buckets of {size}, f = {f}"
                        refusals.setdefault((where, c["refused"]), []).append(kind)
                    else:
                        vals.append(c["perplexity"])
                        row.append(f"{c['perplexity']:.2f} [{c['buckets_corrupted']}]")
                worst = f"{max(vals):.2f}" if vals else "—"
                lines.append(
                    f"| secure+{rule} ({params}), buckets of {size} | "
                    + " | ".join(row)
                    + f" | {worst} |"
                )
        lines.append("")
    clean = [c for c in cells if c["f"] == 0]
    lines.append(
        "Clean (f = 0): "
        + "; ".join(
            f"{c['rule']} buckets of {c['bucket_size']}: "
            + ("—" if c["perplexity"] is None else f"{c['perplexity']:.2f}")
            for c in clean
        )
        + "."
    )
    lines += ["", "Refused:", ""]
    lines += [f"- {w} ({', '.join(k)}): {why}" for (w, why), k in refusals.items()]
    return lines


def markdown(result: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [
        f"# Robust rules under attack (n = {N}, SmolLM2-135M 4-bit, {result['steps']} steps)",
        "",
        f"Base model perplexity {result['base_perplexity']:.2f}; clean FedAvg "
        f"{summary['clean_fedavg_perplexity']:.2f}. Cells: held-out perplexity "
        "(— = the rule refused: too few valid updates for its bound, no adapter). "
        "worst = the highest perplexity among the attacks where the rule produced an adapter.",
        "",
    ]
    for f in FS[1:]:
        lines += [f"## f = {f}", "", "| rule | " + " | ".join(ATTACKS) + " | worst |"]
        lines.append("|---" * (len(ATTACKS) + 2) + "|")
        for name in RULES:
            row = []
            for kind in ATTACKS:
                c = next(
                    x
                    for x in result["cells"]
                    if x["rule"] == name and x["f"] == f and x["attack"] == kind
                )
                row.append("—" if c["perplexity"] is None else f"{c['perplexity']:.2f}")
            w = summary["worst_case_perplexity"][name][f]
            lines.append(
                f"| {name} | " + " | ".join(row) + f" | {'—' if w is None else f'{w:.2f}'} |"
            )
        lines.append("")
    lines.append(
        f"Best robust rule at f = 3: {summary['best_robust_rule_at_f3']} "
        f"(worst {summary['best_robust_worst_at_f3']:.2f}); undefended FedAvg worst "
        f"{summary['fedavg_worst_at_f3']:.2f}."
    )
    lines += ["", *secure_markdown(result)]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_f in summary["worst_case_perplexity"].items():
        xs = [f for f in FS if by_f[f] is not None]
        ax.plot(xs, [by_f[f] for f in xs], marker="o", label=name)
    ax.axhline(
        summary["clean_fedavg_perplexity"], color="grey", linestyle="--", label="clean FedAvg"
    )
    ax.set_yscale("log")
    ax.set_xticks(list(FS))
    ax.set_xlabel("Byzantine participants f (of 10)")
    ax.set_ylabel("worst-case held-out perplexity")
    ax.set_title("Worst case over attacks, per rule")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = run(args.steps)
    summary = summarise(result)
    out = args.out or RESULTS_DIR / "robustness.json"
    md_path = out.with_suffix(".md")
    png_path = out.with_suffix(".png")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(result, summary))
    plot(summary, png_path)
    write_result("robustness", {**result, "summary": summary}, out)
    print(f"wrote {md_path} and {png_path}")


if __name__ == "__main__":
    main()
