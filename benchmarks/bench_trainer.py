"""Trainer throughput, memory and model load times on SmolLM2-135M in 4-bit NF4.

- `tokens_per_s`: the hearthnet trainer (QLoRATrainer.train) against a minimal hand-written
  peft + bitsandbytes loop with the same model, batches and hyper-parameters, in the same run;
  both timed over the same steps after the first (warm-up), `throughput_ratio` = ours / baseline
  (target ≥ 0.95);
- `peak_rss_mib`: the process's peak resident memory during our training run;
- `load_cold_s`: GGUF → safetensors cache conversion plus the 4-bit load; `load_warm_s`: the
  4-bit load from the cache (what every later start pays).

    .venv/bin/python -m benchmarks.bench_trainer [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch

from benchmarks._common import PeakRSS, write_result
from hearthnet.config import FedLearnConfig
from hearthnet.fedlearn.manifest import RoundManifestDraft
from hearthnet.fedlearn.trainer import QLoRATrainer
from hearthnet.identity import NodeIdentity
from hearthnet.llm import model as M

TEXTS = [
    f"Einsatzbericht {i}: Die Feuerwehr Kleve rückte um {8 + i % 12} Uhr zur Rheinstraße "
    f"aus. Meldung: Wasserschaden im Keller, {2 + i % 4} Fahrzeuge vor Ort."
    for i in range(64)
]


def manifest(steps: int, sha: str):  # type: ignore[no-untyped-def]
    draft = RoundManifestDraft(
        base_model_id="SmolLM2-135M-Instruct",
        base_model_sha=sha,
        lora_target_modules=("q_proj", "v_proj"),
        lora_rank=8,
        lora_alpha=16,
        train_steps=steps,
        learning_rate=1e-4,
        batch_size=4,
        seed=7,
        min_participants=1,
        max_participants=8,
        topic="bench",
        consent_text="bench",
        clip_norm=0.0,
        deadline=datetime.now(UTC) + timedelta(hours=1),
    )
    return draft.build(NodeIdentity.generate(), FedLearnConfig(min_round_participants=1)).manifest


def baseline(model_dir: Path, m, batches) -> list[float]:  # type: ignore[no-untyped-def]
    """The minimal loop: stock peft on the 4-bit model, AdamW, nothing else."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        M.load_4bit(model_dir, "cpu"),
        LoraConfig(
            r=m.lora_rank,
            lora_alpha=m.lora_alpha,
            lora_dropout=m.lora_dropout,
            target_modules=list(m.lora_target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=m.learning_rate)
    stamps = []
    for ids, mask, labels in batches:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        source = M.resolve_source(None)
        start = time.perf_counter()
        sha = M.weights_sha(source, cache)
        model_dir = M.model_dir(source, cache, sha)
        M.load_4bit(model_dir, "cpu")
        cold = time.perf_counter() - start
        start = time.perf_counter()
        M.load_4bit(model_dir, "cpu")
        M.load_tokenizer(model_dir)
        warm = time.perf_counter() - start

        m = manifest(args.steps, sha)
        trainer = QLoRATrainer(model_dir)
        stamps: list[float] = []
        with PeakRSS(interval_s=0.05) as rss:  # sparse sampling: no GIL contention
            result = trainer.train(m, TEXTS, progress=lambda *_: stamps.append(time.perf_counter()))
        # Rebuild exactly the batches the trainer used (same tokenizer, seed and order).
        tokenizer = M.load_tokenizer(model_dir)
        seqs = trainer._tokenize(tokenizer, TEXTS)
        order = torch.Generator().manual_seed(m.seed)
        queue: list[int] = []
        batches = []
        for _ in range(result.steps):
            while len(queue) < m.batch_size:
                queue += torch.randperm(len(seqs), generator=order).tolist()
            chosen, queue = queue[: m.batch_size], queue[m.batch_size :]
            batches.append(trainer._batch([seqs[i] for i in chosen], int(tokenizer.pad_token_id)))
        base_stamps = baseline(model_dir, m, batches)
    timed_tokens = sum(int(mask.sum()) for _, mask, _ in batches[1:])
    ours_s = stamps[-1] - stamps[0]
    base_s = base_stamps[-1] - base_stamps[0]
    write_result(
        "trainer",
        {
            "steps": result.steps,
            "timed_steps": result.steps - 1,
            "tokens_timed": timed_tokens,
            "tokens_per_s": round(timed_tokens / ours_s, 1),
            "baseline_tokens_per_s": round(timed_tokens / base_s, 1),
            "throughput_ratio": round(base_s / ours_s, 3),
            "target_throughput_ratio": 0.95,
            "peak_rss_mib": round(rss.peak_mib, 1),
            "rss_growth_during_training_mib": round(rss.peak_mib - rss.start_mib, 1),
            "load_cold_s": round(cold, 2),
            "load_warm_s": round(warm, 2),
            "final_loss": round(result.train_loss, 4),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
