"""Coordinator overhead of a round: from the last submission received to the result published.

Real nodes on loopback (coordinator + n participants, n ∈ {3, 8}) run real rounds; only
training is replaced, by fixed pre-computed deltas of SmolLM2-135M's real LoRA shapes (rank 16
on q/k/v/o), so the number measured is the daemon's own work: validation, the event log,
blob storage, aggregation and signing. The baseline, timed in the same run, is
`aggregate_submissions` alone over the same stored deltas (the unavoidable compute).

    .venv/bin/python -m benchmarks.bench_round [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import write_result
from hearthnet.fedlearn.aggregation.run import aggregate_submissions
from hearthnet.fedlearn.delta import serialize_delta
from hearthnet.fedlearn.lora import expected_shapes
from hearthnet.fedlearn.participant import RoundParticipant
from hearthnet.fedlearn.state import Membership
from tests.fedlearn.rounds import small_draft, start_cluster, stop_cluster

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


async def _fixed_delta(self: RoundParticipant, member: Membership) -> None:
    """Stands in for training: a fixed delta of the real shapes, seeded per participant."""
    m = member.signed.manifest
    gen = torch.Generator().manual_seed(int(self.ctx.node_id.encode().hex()[:8], 16))
    shapes = expected_shapes(m, self.ctx.model_shapes())
    delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in shapes.items()}
    data = serialize_delta(
        delta,
        manifest_sha=member.signed.manifest_sha,
        round_id=m.round_id,
        participant=self.ctx.node_id,
    )
    sha = await asyncio.to_thread(self.ctx.blobs.put, data)
    await self._emit(
        member, "trained", {"blob_sha": sha, "num_samples": 100, "train_loss": 1.0, "steps": 1}
    )


async def one_round(tmp: Path, model_dir: Path, n: int) -> dict[str, Any]:
    names = ["coord"] + [f"p{i}" for i in range(n)]
    cluster = await start_cluster(tmp, names, model_dir, fedlearn={"max_round_participants": 32})
    try:
        coordinator = cluster["coord"].fedlearn.coordinator
        draft = small_draft(
            lora_target_modules=MODULES,
            lora_rank=16,
            lora_alpha=32,
            min_participants=n,
            max_participants=n,
            deadline_in_s=600,
        )
        ann = await cluster.call("coord", "round.announce", {"draft": draft})
        marks: dict[str, float] = {}

        async def watch() -> None:
            async with coordinator.changed:
                await coordinator.changed.wait_for(
                    lambda: len(coordinator.rounds[ann.round_id].submissions) == n
                )
                marks["last_submission"] = time.perf_counter()
                await coordinator.changed.wait_for(
                    lambda: coordinator.rounds[ann.round_id].result is not None
                )
                marks["published"] = time.perf_counter()

        watcher = asyncio.create_task(watch())
        await asyncio.gather(
            *(
                cluster.call(p, "round.join", {"round_id": ann.round_id, "consent": True})
                for p in names[1:]
            )
        )
        await asyncio.wait_for(watcher, 300)
        record = coordinator.rounds[ann.round_id]
        subs = {p: s.submission for p, s in record.submissions.items()}
        blobs = cluster["coord"].blobs
        shapes = cluster["coord"].fedlearn.ctx.model_shapes()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            agg = aggregate_submissions(record.signed, subs, blobs.path, shapes)
            times.append(time.perf_counter() - start)
        assert agg.adapter == blobs.get(record.adapter_sha or "")  # same bytes as published
        overhead = marks["published"] - marks["last_submission"]
        compute = statistics.median(times)
        delta_bytes = blobs.path(next(iter(subs.values())).delta_sha).stat().st_size
        return {
            "n": n,
            "delta_mib": round(delta_bytes / 2**20, 2),
            "last_submission_to_published_s": round(overhead, 4),
            "aggregate_only_s": round(compute, 4),
            "daemon_overhead_s": round(overhead - compute, 4),
            "ratio_to_aggregate_only": round(overhead / compute, 2),
        }
    finally:
        await stop_cluster(cluster)


async def run() -> dict[str, Any]:
    from hearthnet.llm import model as M

    RoundParticipant._train = _fixed_delta  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        source = M.resolve_source(None)
        model_dir = M.model_dir(source, tmp / "models", M.weights_sha(source, tmp / "models"))
        rows = [await one_round(tmp / f"n{n}", model_dir, n) for n in (3, 8)]
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="result file (default benchmarks/results/round.json)"
    )
    args = parser.parse_args()
    result = asyncio.run(run())
    write_result("round", result, args.out)


if __name__ == "__main__":
    main()
