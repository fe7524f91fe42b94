"""What bitsandbytes' packed CPU path is worth: generation speed with and without it.

On a CPU with AVX512-BF16, bitsandbytes packs each 4-bit layer on its first inference forward
and then multiplies with a bf16 kernel; hearthnet keeps that path and makes it safe
(hearthnet/llm/quant.py). This measures, in one run and through LLMService (what a node uses):

- `packed_tokens_per_s` vs `unpacked_tokens_per_s`: greedy generation of the same prompts, the
  two paths alternated, best of `--repeats`; `speedup` = packed / unpacked;
- `perplexity_packed` / `perplexity_unpacked`: held-out perplexity on each path (the packed
  kernel computes in bf16, so the numbers differ slightly; both are reported);
- `guard_restore_s`: what the guard costs when an adapter is loaded into a used model (restoring
  every layer exactly, checked against its SHA).

On a CPU without AVX512-BF16 the packed path does not exist: the result says so
(`cpu_packing: false`) and reports the unpacked numbers alone.

    .venv/bin/python -m benchmarks.bench_generation [--tokens 48] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks._common import write_result
from hearthnet.config import LLMSection
from hearthnet.llm.quant import cpu_packing_supported, pack_as_inference, set_cpu_packing, unpack
from hearthnet.llm.service import LLMService

PROMPTS = [
    "Write a short notice about the village water supply being cut on Tuesday.",
    "Summarise the rules of the community garden in two sentences.",
    "What should a volunteer bring to the Saturday river clean-up?",
]
HELD_OUT = [
    "The community hall will be closed on Monday for floor repairs; the choir meets at the "
    "school instead.",
    "Residents are reminded that bulky waste is collected on the first Thursday of each month.",
]


def generation_rate(svc: LLMService, tokens: int) -> float:
    """Generated tokens per second over all prompts (greedy)."""
    produced, start = 0, time.perf_counter()
    for prompt in PROMPTS:
        text = svc.generate(prompt, None, max_new_tokens=tokens)
        produced += len(svc.tokenizer(text)["input_ids"])
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    supported = cpu_packing_supported()
    with tempfile.TemporaryDirectory(prefix="hn-bench-gen-") as tmp:
        svc = LLMService(LLMSection(), Path(tmp))
        svc.load()
        model = svc._model
        svc.generate(PROMPTS[0], None, max_new_tokens=4)  # warm-up (and, where supported, pack)
        packed: list[float] = []
        unpacked: list[float] = []
        for _ in range(args.repeats):
            if supported:
                set_cpu_packing(model, True)
                packed.append(generation_rate(svc, args.tokens))
            set_cpu_packing(model, False)
            unpacked.append(generation_rate(svc, args.tokens))
        ppl_unpacked = svc.perplexity(HELD_OUT)
        result: dict[str, object] = {
            "cpu_packing": supported,
            "tokens_per_prompt": args.tokens,
            "prompts": len(PROMPTS),
            "unpacked_tokens_per_s": round(max(unpacked), 2),
            "perplexity_unpacked": round(ppl_unpacked, 4),
        }
        pack_as_inference(model)  # the layout a used model has on an AVX512-BF16 CPU
        start = time.perf_counter()
        unpack(model)
        result["guard_restore_s"] = round(time.perf_counter() - start, 4)
        if supported:
            set_cpu_packing(model, True)
            result.update(
                {
                    "packed_tokens_per_s": round(max(packed), 2),
                    "speedup": round(max(packed) / max(unpacked), 3),
                    "perplexity_packed": round(svc.perplexity(HELD_OUT), 4),
                }
            )
        else:
            result["note"] = (
                "this CPU has no AVX512-BF16: bitsandbytes has no packed path here, so only the "
                "unpacked path was measured"
            )
    write_result("generation", result, args.out)


if __name__ == "__main__":
    main()
