"""Aggregation cost: exact deterministic FedAvg and coordinator memory.

For n participants and P parameters (frozen_a: B matrices of 4096 × 16 per layer):
- `fedavg_ratio`: FedAggregator-style exact weighted mean, tensor by tensor, as a ratio to a plain
  float `torch.stack(...).mean(0)` over the same tensors in the same run (target ≤ 3);
- `coordinator_peak_above_start_mib`: a fresh coordinator process's peak resident memory above
  its start while aggregating the n deltas streamed from safetensors files; compare with
  `all_deltas_mib` (what loading every delta at once would take) and `adapter_out_mib`.

Secure aggregation (masking, unmasking, against Flower) is `bench_secagg.py`.

    .venv/bin/python -m benchmarks.bench_aggregation [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import PeakRSS, write_result
from hearthnet.config import FedLearnConfig
from hearthnet.fedlearn.aggregation.aggregator import FedAvgAggregator
from hearthnet.fedlearn.aggregation.exact import exact_weighted_means, plan_groups
from hearthnet.fedlearn.delta import LazyDelta, serialize_delta
from hearthnet.fedlearn.lora import expected_shapes
from hearthnet.fedlearn.manifest import RoundManifestDraft, SignedManifest
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.identity import NodeIdentity

RANK, OUT, IN = 16, 4096, 4096


def setup_shapes(params: int) -> dict[str, tuple[int, int]]:
    """B matrices of OUT × RANK on q_proj, as many layers as make about `params` values."""
    layers = max(1, round(params / (OUT * RANK)))
    return {f"model.layers.{i}.self_attn.q_proj": (OUT, IN) for i in range(layers)}


def setup(
    n: int, params: int, **overrides: Any
) -> tuple[SignedManifest, dict[str, tuple[int, int]]]:
    """A signed manifest for `n` participants over `setup_shapes(params)` (fields in
    `overrides` replace the draft's, e.g. `secure=True`)."""
    shapes = setup_shapes(params)
    draft = RoundManifestDraft(
        base_model_id="bench",
        base_model_sha="0" * 64,
        lora_target_modules=("q_proj",),
        lora_rank=RANK,
        lora_alpha=32,
        train_steps=1,
        learning_rate=1e-3,
        batch_size=1,
        seed=1,
        min_participants=3,
        max_participants=n,
        topic="bench",
        consent_text="bench",
        deadline=datetime.now(UTC) + timedelta(hours=1),
        **overrides,
    )
    config = FedLearnConfig(min_round_participants=1, max_round_participants=max(n, 2))
    return draft.build(NodeIdentity.generate(), config), shapes


def deltas(
    signed: SignedManifest, shapes: dict[str, tuple[int, int]], n: int
) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    keys = expected_shapes(signed.manifest, shapes)
    return [{k: torch.randn(s, generator=gen) * 1e-3 for k, s in keys.items()} for _ in range(n)]


def interleaved_best(
    ours: Callable[[], object], baseline: Callable[[], object], repeats: int = 7
) -> tuple[float, float]:
    """Best-of timings taken alternately, so machine noise hits both sides alike."""
    best_ours = best_base = float("inf")
    for _ in range(repeats):
        for fn, is_ours in ((ours, True), (baseline, False)):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if is_ours:
                best_ours = min(best_ours, elapsed)
            else:
                best_base = min(best_base, elapsed)
    return best_ours, best_base


def fedavg_timing(n: int, params: int) -> dict[str, float]:
    signed, shapes = setup(n, params)
    ds = deltas(signed, shapes, n)
    keys = sorted(ds[0])
    weights = list(range(10, 10 + n))

    def ours() -> None:  # what FedAvgAggregator runs: small keys batched, large ones windowed
        for group in plan_groups([ds[0][k].numel() for k in keys]):
            exact_weighted_means([[d[keys[i]] for d in ds] for i in group], weights)

    def baseline() -> None:
        for k in keys:
            torch.stack([d[k] for d in ds]).mean(0)

    t_ours, t_base = interleaved_best(ours, baseline)
    return {
        "fedavg_s": round(t_ours, 4),
        "stack_mean_s": round(t_base, 4),
        "fedavg_ratio": round(t_ours / t_base, 3),
    }


def write_inputs(n: int, params: int, folder: Path) -> None:
    """Delta files and signed submissions, written by the parent so the child only aggregates."""
    signed, shapes = setup(n, params)
    gen = torch.Generator().manual_seed(0)
    keys = expected_shapes(signed.manifest, shapes)
    subs = []
    for i in range(n):
        ident = NodeIdentity.generate()
        d = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in keys.items()}
        data = serialize_delta(
            d, manifest_sha=signed.manifest_sha, round_id=signed.round_id, participant=ident.node_id
        )
        (folder / f"{i}.safetensors").write_bytes(data)
        subs.append(
            ParticipantSubmission.create(ident, signed.round_id, data, 10, 0.0).model_dump()
        )
    (folder / "round.json").write_text(
        json.dumps(
            {
                "manifest": signed.to_wire(),
                "coordinator": signed.manifest.coordinator,
                "shapes": shapes,
                "submissions": subs,
            }
        )
    )


def memory_child(folder: Path) -> None:
    """In a fresh process: stream the delta files through the aggregator, report peak RSS."""
    spec = json.loads((folder / "round.json").read_text())
    signed = SignedManifest.from_wire(spec["manifest"], roster=[spec["coordinator"]])
    shapes = {k: tuple(v) for k, v in spec["shapes"].items()}
    subs = [ParticipantSubmission.model_validate(s) for s in spec["submissions"]]
    with PeakRSS() as rss:
        agg = FedAvgAggregator(signed.manifest, shapes)
        for i, sub in enumerate(subs):
            agg.add(sub, LazyDelta(folder / f"{i}.safetensors"))
        out = agg.aggregate()
    n = len(subs)
    params = sum(t.numel() for k, t in out.items() if k.endswith(".lora_B"))
    print(
        json.dumps(
            {
                "coordinator_peak_rss_mib": round(rss.peak_mib, 1),
                "coordinator_peak_above_start_mib": round(rss.peak_mib - rss.start_mib, 1),
                "adapter_out_mib": round(
                    sum(t.numel() * t.element_size() for t in out.values()) / 2**20, 1
                ),
                "all_deltas_mib": round(n * params * 4 / 2**20, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n in {3, 10}, P = 1M only")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    ns = (3, 10) if args.quick else (3, 10, 32)
    ps = (1_000_000,) if args.quick else (1_000_000, 10_000_000)
    rows = []
    for params in ps:
        for n in ns:
            row: dict[str, object] = {"n": n, "params": params}
            row.update(fedavg_timing(n, params))
            with tempfile.TemporaryDirectory() as tmp:
                write_inputs(n, params, Path(tmp))
                # A fixed mmap threshold makes glibc return freed blocks of >= 128 KiB to the
                # OS at once, so the sampled RSS follows live memory rather than what the heap
                # keeps around after frees.
                child = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_aggregation", "--memory-child", tmp],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
                )
            row.update(json.loads(child.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    target = next((r for r in rows if r["n"] == 10 and r["params"] == 10_000_000), None)
    write_result(
        "aggregation",
        {
            "rows": rows,
            "max_fedavg_ratio": max(float(r["fedavg_ratio"]) for r in rows),  # type: ignore[arg-type]
            "targets": {"fedavg_ratio_le": 3.0},
            "at_n10_p10m": target,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
