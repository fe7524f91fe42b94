"""Privacy against utility: held-out perplexity of SmolLM2-135M (4-bit) + the aggregated adapter
under participant-level DP, with fixed and adaptive clipping (hearthnet/fedlearn/clipping.py).

n = 10 participants with the non-IID village-notice shards of bench_robustness, the demo's
training settings (frozen_a LoRA rank 8 on q/k/v/o, 30 steps, lr 3e-3, batch 4). A topic runs
R = 3 rounds; every round trains from the base model (as hearthnet rounds do) with the round's
own seed (11, 12, 13: its own A and batch order), so each participant trains once per round and
that unclipped delta is cached and shared by every configuration (round 1 reuses
bench_robustness's cache: the same training). What varies per configuration is exactly what
the participant's trainer does after training: measure the norm, report the noised bit
1[‖Δ‖ ≤ C] + N(0, σ_b²) (adaptive only), clip to C, add N(0, (z_Δ·C)²) from a fresh ChaCha20
noise source. The coordinator's FedAvg (the real aggregator) averages the 10 submissions, and
for adaptive policies the next round's C follows C·exp(−η(b̄ − γ)), noise scaled with it.

ε per round ∈ {1, 4, 16, ∞} at δ = 1e-5 is the RDP accountant's one-round Gaussian ε for the
total multiplier z; fixed clipping adds noise z·C, adaptive splits z between the delta and the
bit (σ_b = z, so z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) ≈ 1.15·z). Clip settings: fixed C = 1 (the old
default), fixed C = 24 (≈ the measured median 30-step norm, the new default), adaptive from
C = 24 (η = 0.2, γ = 0.5: the new default policy) and adaptive from C = 1 (η = 1.0: how fast it
recovers from a bad start). The baseline in the same run: no DP, no clipping.

    flock /tmp/hn-heavy.lock .venv/bin/python -m benchmarks.bench_privacy_utility [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench_robustness as R
from benchmarks._common import RESULTS_DIR, train_cached, write_result
from hearthnet import constants as C
from hearthnet.config import FedLearnConfig
from hearthnet.fedlearn import clipping
from hearthnet.fedlearn.budget import composed_epsilon
from hearthnet.fedlearn.manifest import RoundManifest, RoundManifestDraft
from hearthnet.fedlearn.privacy import NoiseSource, add_dp_noise, clip_gradient, global_norm
from hearthnet.identity import NodeIdentity
from hearthnet.llm import model as M

N = R.N
ROUNDS = 3
SEEDS = tuple(11 + r for r in range(ROUNDS))
EPSILONS: tuple[float, ...] = (1.0, 4.0, 16.0, math.inf)
DELTA = C.FEDLEARN_DP_DELTA_DEFAULT
# name: (initial clip, adaptive policy or None)
CLIPS: dict[str, tuple[float, clipping.AdaptiveClip | None]] = {
    "fixed C=1": (1.0, None),
    "fixed C=24": (24.0, None),
    "adaptive C0=24 η=0.2": (24.0, clipping.AdaptiveClip(0.5, 0.2, 0.0)),
    "adaptive C0=1 η=1": (1.0, clipping.AdaptiveClip(0.5, 1.0, 0.0)),
}
CACHE = RESULTS_DIR / "privacy_cache"


def manifest(sha: str, steps: int, seed: int) -> RoundManifest:
    draft = RoundManifestDraft(
        base_model_id="SmolLM2-135M-Instruct",
        base_model_sha=sha,
        lora_target_modules=R.MODULES,
        lora_rank=8,
        lora_alpha=16,
        train_steps=steps,
        learning_rate=3e-3,
        batch_size=4,
        seed=seed,
        min_participants=1,
        max_participants=N,
        topic="hearthdale",
        consent_text="bench",
        clip_norm=0.0,
        deadline=datetime.now(UTC) + timedelta(hours=1),
    )
    return draft.build(NodeIdentity.generate(), FedLearnConfig(min_round_participants=1)).manifest


def round_deltas(
    model_dir: Path, sha: str, steps: int, seed: int, private: list[list[str]]
) -> list[dict[str, torch.Tensor]]:
    """Each participant's unclipped delta for the round of `seed`, trained once and cached."""
    if seed == 11:  # bench_robustness trains exactly this round
        return R.honest_deltas(model_dir, sha, steps, private)
    stop_rule = {k: v for k, v in vars(C).items() if k.startswith("TRAIN_PLATEAU_")}
    key = hashlib.sha256(
        json.dumps([sha, steps, seed, private, R.MODULES, stop_rule], sort_keys=True).encode()
    ).hexdigest()[:16]
    folder = CACHE / key
    folder.mkdir(parents=True, exist_ok=True)
    return train_cached(
        folder, model_dir, manifest(sha, steps, seed), private, f"round seed {seed}: "
    )


def total_multiplier(eps: float) -> float:
    """The z whose one-round Gaussian ε at DELTA is `eps` (bisection on the accountant)."""
    lo, hi = 1e-3, 1e3
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        if composed_epsilon([mid], DELTA) > eps:
            lo = mid
        else:
            hi = mid
    return hi


def participant(
    delta: dict[str, torch.Tensor],
    clip: float,
    z_delta: float,
    sigma_b: float,
    adaptive: bool,
    rng: NoiseSource,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """What the trainer does after training: the bit (adaptive), clip, noise."""
    norm = global_norm(delta)
    bit = None
    if adaptive:
        bit = clipping.noised_bit(norm, clip, sigma_b, float(rng.normal((1,))[0]))
    out = clip_gradient(delta, clip)
    if z_delta > 0:
        out = add_dp_noise(out, z_delta * clip, rng)
    return out, bit


def run(steps: int) -> dict[str, Any]:
    cache_root = RESULTS_DIR / "model-cache"
    source = M.resolve_source(None)
    sha = M.weights_sha(source, cache_root)
    model_dir = M.model_dir(source, cache_root, sha)
    shapes = M.linear_shapes(model_dir)
    private, held_out = R.shards(48)
    manifests = [manifest(sha, steps, s) for s in SEEDS]
    started = time.perf_counter()
    deltas = [round_deltas(model_dir, sha, steps, s, private) for s in SEEDS]
    train_s = time.perf_counter() - started
    norms = [[round(global_norm(d), 3) for d in rnd] for rnd in deltas]
    ev = R.Evaluator(model_dir, manifests[0], held_out)
    ids = [NodeIdentity.generate() for _ in range(N)]
    order = sorted(range(N), key=lambda i: ids[i].node_id)

    def aggregate_ppl(r: int, submitted: list[dict[str, torch.Tensor]]) -> float:
        adapter, dropped, _, refused = R.aggregate(
            manifests[r], [submitted[i] for i in order], shapes, [ids[i] for i in order]
        )
        if adapter is None or dropped:
            raise RuntimeError(f"round refused or dropped updates: {refused} {dropped}")
        return ev.perplexity(adapter)

    base_ppl = ev.perplexity(None)
    baseline = [round(aggregate_ppl(r, deltas[r]), 4) for r in range(ROUNDS)]
    print(f"base {base_ppl:.2f}, no-DP unclipped per round {baseline}", file=sys.stderr)
    cells: list[dict[str, Any]] = []
    for eps in EPSILONS:
        z = 0.0 if math.isinf(eps) else total_multiplier(eps)
        for name, (clip0, policy) in CLIPS.items():
            adaptive = policy is not None
            sigma_b = z if adaptive else 0.0  # no DP: the bit is released exactly
            z_delta = clipping.delta_multiplier(z, sigma_b) if adaptive and z > 0 else z
            clip = clip0
            per_round = []
            for r in range(ROUNDS):
                rng = NoiseSource()
                out = [participant(d, clip, z_delta, sigma_b, adaptive, rng) for d in deltas[r]]
                ppl = aggregate_ppl(r, [o[0] for o in out])
                row: dict[str, Any] = {
                    "round": r + 1,
                    "clip": round(clip, 4),
                    "perplexity": round(ppl, 4),
                    "clipped": sum(1 for d in deltas[r] if global_norm(d) > clip),
                }
                if policy is not None:
                    b_bar = clipping.mean_bit(o[1] for o in out if o[1] is not None)
                    row["b_bar"] = round(b_bar, 4)
                    clip = clipping.next_clip(clip, b_bar, policy)
                per_round.append(row)
            z_round = clipping.effective_multiplier(z_delta, sigma_b) if adaptive else z
            eps_round = composed_epsilon([z_round if z_round > 0 else None], DELTA)
            eps_topic = composed_epsilon([z_round if z_round > 0 else None] * ROUNDS, DELTA)
            cell = {
                "epsilon_target": None if math.isinf(eps) else eps,
                "clip_setting": name,
                "z_total": round(z, 4),
                "z_delta": round(z_delta, 4),
                "sigma_b": round(sigma_b, 4),
                "epsilon_round_accounted": None if math.isinf(eps_round) else round(eps_round, 3),
                "epsilon_3_rounds": None if math.isinf(eps_topic) else round(eps_topic, 3),
                "rounds": per_round,
                "final_perplexity": per_round[-1]["perplexity"],
            }
            cells.append(cell)
            print(json.dumps(cell), file=sys.stderr)
    return {
        "n": N,
        "rounds": ROUNDS,
        "steps": steps,
        "delta": DELTA,
        "training_s": round(train_s, 1),
        "delta_norms": norms,
        "delta_norm_median": round(statistics.median(x for rnd in norms for x in rnd), 3),
        "base_perplexity": round(base_ppl, 4),
        "no_dp_unclipped_perplexity": baseline,
        "cells": cells,
    }


def markdown(result: dict[str, Any]) -> str:
    """The README's table: final-round perplexity per ε and clip setting."""
    eps_cols = ["1", "4", "16", "∞"]
    lines = [
        "| clip setting | " + " | ".join(f"ε = {e}" for e in eps_cols) + " |",
        "|---|" + "---:|" * len(eps_cols),
    ]
    for name in CLIPS:
        row = []
        for eps in EPSILONS:
            target = None if math.isinf(eps) else eps
            cell = next(
                c
                for c in result["cells"]
                if c["clip_setting"] == name and c["epsilon_target"] == target
            )
            clips = " → ".join(f"{r['clip']:.3g}" for r in cell["rounds"])
            row.append(f"{cell['final_perplexity']:.2f} (C {clips})")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    base = result["no_dp_unclipped_perplexity"]
    lines.append(
        f"| no DP, no clipping (baseline) | {base[-1]:.2f} | | | |"
        f"\n\nBase model without adapter: {result['base_perplexity']:.2f}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = run(args.steps)
    out = args.out or RESULTS_DIR / "privacy_utility.json"
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    write_result("privacy_utility", {**result, "table": md}, out)
    print(md)


if __name__ == "__main__":
    main()
