"""Shared plumbing for benchmark programs: machine facts and writing the JSON result."""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from hearthnet.llm.quant import cpu_features

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "system": platform.system(),
        "cpu_features": cpu_features(),
    }


def write_result(name: str, result: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **result,
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(json.dumps(doc, indent=2, sort_keys=True))
    print(f"wrote {path}")
    return path


class PeakRSS:
    """Samples this process's RSS from a thread: this sandbox's kernel keeps no usable VmHWM
    (it equals VmRSS) and ru_maxrss survives exec, so a peak has to be observed."""

    def __init__(self, interval_s: float = 0.001):
        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.start_mib = self.peak_mib = self._proc.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self._proc.memory_info().rss / 2**20)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self._proc.memory_info().rss / 2**20)


def train_cached(
    folder: Path, model_dir: Path, manifest: Any, private: list[list[str]], label: str
) -> list[dict[str, Any]]:
    """Each participant's delta for `manifest`, trained once with the real QLoRA trainer and
    cached as `folder/participant-<i>.safetensors` (the caller keys `folder` by everything that
    changes the result); later runs read the cache."""
    from safetensors.torch import load_file, save_file

    from hearthnet.fedlearn.trainer import QLoRATrainer

    out = []
    for i, texts in enumerate(private):
        path = folder / f"participant-{i}.safetensors"
        if not path.exists():
            start = time.perf_counter()
            result = QLoRATrainer(model_dir).train(manifest, texts)
            save_file({k: v.contiguous() for k, v in result.delta.items()}, str(path))
            print(
                f"{label}trained participant {i}: loss {result.train_loss:.3f}, "
                f"{result.steps} of {manifest.train_steps} steps, "
                f"in {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
            )
        out.append(load_file(str(path)))
    return out
