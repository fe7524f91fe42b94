"""Cost of the robust rules: milliseconds per rule, and as a ratio to baselines in the same run.

For n participants and P parameters (one flat float32 tensor each), every rule runs through the
functional entry point `hearthnet.fedlearn.aggregation.robust.aggregate` (finiteness check
included) and is compared with, in the same process and on the same tensors:
- `mean`: a plain `torch.stack(xs).mean(0)` (`ratio_to_mean`);
- `sort`: the straightforward coordinate-wise implementation, `torch.stack` then
  `torch.sort(dim=0)` then the mean of the kept rows (trimmed mean) or the middle row(s)
  (median) (`speedup_vs_sort` for those two rules).
Targets at n = 10, P = 1M: trimmed mean and median at least 3× faster than `sort`; Krum
at most 50 ms. Times are the median of several runs after one warm-up.

    .venv/bin/python -m benchmarks.bench_robust_overhead [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import write_result
from hearthnet.fedlearn.aggregation.robust import aggregate

BETA = 0.2


def _time(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up: compilation cache, page faults
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def sort_trimmed_mean(xs: list[torch.Tensor], beta: float) -> torch.Tensor:
    n = len(xs)
    k = math.floor(beta * n)
    values, _ = torch.sort(torch.stack(xs), dim=0)
    return values[k : n - k].mean(0)


def sort_median(xs: list[torch.Tensor]) -> torch.Tensor:
    n = len(xs)
    values, _ = torch.sort(torch.stack(xs), dim=0)
    if n % 2:
        return values[n // 2]
    return (values[n // 2 - 1] + values[n // 2]) / 2


def rules_for(n: int) -> dict[str, dict[str, Any]]:
    f = (n - 3) // 3  # Krum's n ≥ 2f + 3 with room to spare: 2 at n = 10, 9 at n = 32
    return {
        "fedavg": {},
        "trimmed_mean": {"beta": BETA},
        "median": {},
        "krum": {"f": f},
        "multi_krum": {"f": f},
        "geometric_median": {"f": 1},
        "median+norm_bound": {"norm_bound": 3.0},
    }


def measure(n: int, params: int, reps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(n * 7 + params)
    xs = [torch.randn(params, generator=g) * (1 + i % 3) for i in range(n)]
    row: dict[str, Any] = {"n": n, "params": params}
    mean_s = _time(lambda: torch.stack(xs).mean(0), reps)
    sort_tm_s = _time(lambda: sort_trimmed_mean(xs, BETA), reps)
    sort_md_s = _time(lambda: sort_median(xs), reps)
    row["baseline_ms"] = {
        "mean": round(mean_s * 1e3, 2),
        "sort_trimmed_mean": round(sort_tm_s * 1e3, 2),
        "sort_median": round(sort_md_s * 1e3, 2),
    }
    rules: dict[str, Any] = {}
    for name, params_ in rules_for(n).items():
        rule = name.split("+")[0]
        slow = rule == "geometric_median" and params >= 10_000_000

        def run(r: str = rule, p: dict[str, Any] = params_) -> torch.Tensor:
            return aggregate(r, xs, **p)

        seconds = _time(run, 1 if slow else reps)
        entry: dict[str, Any] = {
            "ms": round(seconds * 1e3, 2),
            "ratio_to_mean": round(seconds / mean_s, 2),
        }
        if name == "trimmed_mean":
            entry["speedup_vs_sort"] = round(sort_tm_s / seconds, 2)
        if name == "median":
            entry["speedup_vs_sort"] = round(sort_md_s / seconds, 2)
        rules[name] = entry
    row["rules"] = rules
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 10, P = 1M only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ns = (10,) if args.quick else (10, 32)
    ps = (1_000_000,) if args.quick else (100_000, 1_000_000, 10_000_000)
    rows = []
    for params in ps:
        for n in ns:
            reps = 7 if params <= 1_000_000 else 3
            row = measure(n, params, reps)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    at = next(r for r in rows if r["n"] == 10 and r["params"] == 1_000_000)["rules"]
    checks = {
        "trimmed_mean_speedup_vs_sort_ge_3": at["trimmed_mean"]["speedup_vs_sort"] >= 3.0,
        "median_speedup_vs_sort_ge_3": at["median"]["speedup_vs_sort"] >= 3.0,
        "krum_ms_le_50": at["krum"]["ms"] <= 50.0,
    }
    write_result(
        "robust_overhead",
        {
            "rows": rows,
            "threads": torch.get_num_threads(),
            "targets_at_n10_p1m": {"speedup_vs_sort_ge": 3.0, "krum_ms_le": 50.0},
            "at_n10_p1m": at,
            "checks": checks,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
