"""QLoRA training of one round's adapter (docs/architecture.md): 4-bit base, LoRA from peft.

A is initialised from the manifest seed exactly as the aggregator derives it (`frozen_a` freezes
it; the other modes train it from that start); B starts at zero. Batches are drawn with a
generator seeded from the manifest, so a rerun on the same data repeats itself. Training stops
after `train_steps` or on a loss plateau (`plateaued`: a confident flat trend, never noise), is
cancellable between steps, and reports progress; the result says how many steps ran.
The delta is clipped to `clip_norm` when the manifest sets one and gets DP noise when it asks,
drawn from a secret generator (never the public manifest seed); under adaptive clipping the
result also carries the noised bit 1[‖Δ‖ ≤ clip_norm] the coordinator's next clip follows.
This is blocking work: the node runs it in a worker thread so its event loop keeps answering.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.clipping import noised_bit
from hearthnet.fedlearn.lora import A_SUFFIX, B_SUFFIX, derive_lora_a, target_layers
from hearthnet.fedlearn.manifest import RoundManifest
from hearthnet.fedlearn.privacy import NoiseSource, add_dp_noise, clip_gradient, global_norm
from hearthnet.llm import model as M
from hearthnet.logs import get_logger

log = get_logger("hearthnet.trainer")

Progress = Callable[[int, int, float], None]


@dataclass
class TrainResult:
    """One local training run: the delta to send, the samples and loss it reports, and how many
    steps ran (and whether a plateau stopped it early)."""

    delta: dict[str, torch.Tensor]  # what is sent: B only in frozen_a
    num_samples: int
    train_loss: float
    steps: int
    stopped_early: bool
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    # adaptive clipping: 1[‖Δ‖ ≤ clip_norm] + N(0, clip_count_noise²), for the coordinator's
    # next clip of the topic (clipping.py); None under a fixed clip and in secure rounds
    clip_bit: float | None = None


def _share(train_steps: int, fraction: float) -> int:
    return math.ceil(round(fraction * train_steps, 9))


def plateau_window(train_steps: int) -> int:
    """How many recent batch losses the plateau test fits a line to."""
    return max(C.TRAIN_PLATEAU_MIN_WINDOW, _share(train_steps, C.TRAIN_PLATEAU_WINDOW_SHARE))


def improvement_bound(window: Sequence[float]) -> float:
    """An upper bound on how much the loss falls across `window`: the least-squares fall per
    step plus TRAIN_PLATEAU_Z standard errors of the slope, times the window's span. Batch
    noise widens the standard error, so noise makes the bound larger (train on), not smaller."""
    n = len(window)
    mid = (n - 1) / 2
    sxx = sum((i - mid) ** 2 for i in range(n))
    mean = statistics.fmean(window)
    slope = sum((i - mid) * (y - mean) for i, y in enumerate(window)) / sxx
    residual = sum((y - mean - slope * (i - mid)) ** 2 for i, y in enumerate(window))
    se = math.sqrt(residual / (n - 2) / sxx)
    return (-slope + C.TRAIN_PLATEAU_Z * se) * (n - 1)


def plateaued(losses: Sequence[float], *, train_steps: int) -> bool:
    """Whether training should stop after `len(losses)` of `train_steps` steps.

    Batch losses of a few uneven texts are noisy (one participant's step-10 loss sat above its
    first batch while it was still learning), so the rule asks for evidence of a flat loss:
    a least-squares line through the last `plateau_window` losses (40% of train_steps, at
    least 10), made 2 standard errors steeper, still falls less than 1% of the window's mean
    loss across the window, on 3 consecutive steps; never before 60% of train_steps, never on
    the last step (nothing to save). A noisy but falling loss trains on; a flat, quiet one
    stops. (Constants: TRAIN_PLATEAU_* in constants.py; docs/decisions.md has the numbers.)
    """
    step = len(losses)
    if step >= train_steps or step < _share(train_steps, C.TRAIN_PLATEAU_MIN_SHARE):
        return False
    width = plateau_window(train_steps)
    if step < width + C.TRAIN_PLATEAU_PATIENCE - 1:
        return False
    for end in range(step - C.TRAIN_PLATEAU_PATIENCE + 1, step + 1):
        window = losses[end - width : end]
        bound = improvement_bound(window)
        # `not <`: a non-finite loss never counts as a plateau
        if not bound < C.TRAIN_PLATEAU_MIN_IMPROVEMENT * abs(statistics.fmean(window)):
            return False
    return True


def default_progress(total: int) -> Progress:
    """A progress bar on a terminal, structured log lines otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc="training", unit="step")

        def tick(step: int, _total: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step == _total:
                bar.close()

        return tick

    every = max(1, total // 10)

    def log_line(step: int, _total: int, loss: float) -> None:
        if step % every == 0 or step == _total:
            log.info("training", step=step, of=_total, loss=round(loss, 4))

    return log_line


_PROCESS_LOCK = threading.Lock()


class QLoRATrainer:
    """Trains one round's LoRA adapter on this node's text over the 4-bit base model in
    `model_dir`; blocking, so the node runs it in a worker thread."""

    def __init__(self, model_dir: Path, device: str = "cpu"):
        self.model_dir = Path(model_dir)
        self.device = device

    def _tokenize(self, tokenizer: Any, samples: list[str]) -> list[torch.Tensor]:
        out = []
        for text in samples:
            ids = tokenizer(text, truncation=True, max_length=C.TRAIN_MAX_SEQ_TOKENS)["input_ids"]
            if len(ids) >= 2:
                out.append(torch.tensor(ids, dtype=torch.long))
        if not out:
            raise HearthnetError(ErrorCode.DATA_INVALID, "no sample is long enough to train on")
        return out

    @staticmethod
    def _batch(
        seqs: list[torch.Tensor], pad: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return ids, mask, labels

    def build(self, manifest: RoundManifest) -> tuple[Any, Any, dict[str, Any]]:
        """The 4-bit base with this round's LoRA, A set from the seed; (model, tokenizer,
        {module path: LoRA layer})."""
        from peft import LoraConfig, get_peft_model

        tokenizer = M.load_tokenizer(self.model_dir)
        base = M.load_4bit(self.model_dir, self.device)
        config = LoraConfig(
            r=manifest.lora_rank,
            lora_alpha=manifest.lora_alpha,
            lora_dropout=manifest.lora_dropout,
            target_modules=list(manifest.lora_target_modules),
            task_type="CAUSAL_LM",
            bias="none",
        )
        model = get_peft_model(base, config)
        expected = target_layers(manifest, M.linear_shapes(self.model_dir))
        layers: dict[str, Any] = {}
        for name, module in model.named_modules():
            path = name.removeprefix("base_model.model.")
            if path in expected and hasattr(module, "lora_A"):
                layers[path] = module
        if set(layers) != set(expected):
            raise HearthnetError(ErrorCode.MODEL_UNAVAILABLE, "LoRA layers differ from the model")
        with torch.no_grad():
            for path, module in layers.items():
                a = module.lora_A["default"].weight
                a.copy_(derive_lora_a(manifest.seed, path, manifest.lora_rank, expected[path][1]))
                module.lora_B["default"].weight.zero_()
                a.requires_grad_(manifest.lora_aggregation != "frozen_a")
        return model, tokenizer, layers

    def train(
        self,
        manifest: RoundManifest,
        samples: list[str],
        *,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
        noise_rng: NoiseSource | None = None,
    ) -> TrainResult:
        """Train the manifest's adapter on `samples` and return the (clipped, noised where the
        manifest asks) delta; `cancel` stops it between steps. One training at a time per
        process, since the model is large."""
        if not samples:
            raise HearthnetError(ErrorCode.DATA_INVALID, "no training samples")
        with _PROCESS_LOCK:  # one training per process: they share torch's threads and memory
            return self._train(manifest, samples, cancel, progress, noise_rng)

    def _train(
        self,
        manifest: RoundManifest,
        samples: list[str],
        cancel: threading.Event | None,
        progress: Progress | None,
        noise_rng: NoiseSource | None,
    ) -> TrainResult:
        model, tokenizer, layers = self.build(manifest)
        try:
            seqs = self._tokenize(tokenizer, samples)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=manifest.learning_rate, weight_decay=0.0)
            order = torch.Generator().manual_seed(manifest.seed)
            report = progress or default_progress(manifest.train_steps)
            pad = int(tokenizer.pad_token_id)
            losses: list[float] = []
            tokens = 0
            queue: list[int] = []
            model.train()
            stopped_early = False
            for step in range(1, manifest.train_steps + 1):
                if cancel is not None and cancel.is_set():
                    raise HearthnetError(ErrorCode.CANCELLED, f"training cancelled at step {step}")
                while len(queue) < manifest.batch_size:  # epochs of seeded permutations
                    queue += torch.randperm(len(seqs), generator=order).tolist()
                chosen, queue = queue[: manifest.batch_size], queue[manifest.batch_size :]
                ids, mask, labels = self._batch([seqs[i] for i in chosen], pad)
                out = model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    labels=labels.to(self.device),
                )
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(out.loss.detach()))
                tokens += int(mask.sum())
                report(step, manifest.train_steps, losses[-1])
                if plateaued(losses, train_steps=manifest.train_steps):
                    stopped_early = True
                    log.info("loss plateau: stopping early", step=step, of=manifest.train_steps)
                    break
            delta = self._extract(layers, manifest)
            if not all(bool(torch.isfinite(t).all()) for t in delta.values()):
                raise HearthnetError(
                    ErrorCode.DATA_INVALID,
                    "training diverged (non-finite LoRA weights); nothing is submitted",
                )
        finally:
            del model
            gc.collect()
        rng = noise_rng or NoiseSource()  # a fresh secret key: unpredictable noise
        clip_bit = None
        if manifest.clip_policy == "adaptive" and manifest.clip_norm > 0 and not manifest.secure:
            # measured before clipping: the coordinator's next clip follows these bits. Not in
            # secure rounds: a plain bit would show the coordinator one participant's fact; it
            # would belong in the masked vector; secure manifests are fixed-clip
            draw = float(rng.normal((1,))[0]) if manifest.clip_count_noise > 0 else 0.0
            clip_bit = noised_bit(
                global_norm(delta), manifest.clip_norm, manifest.clip_count_noise, draw
            )
        if manifest.clip_norm > 0:
            delta = clip_gradient(delta, manifest.clip_norm)
        if manifest.dp_noise_scale > 0:
            delta = add_dp_noise(delta, manifest.dp_noise_scale, rng)
        window = losses[-C.TRAIN_LOSS_MEAN_STEPS :]
        return TrainResult(
            delta=delta,
            num_samples=len(samples),
            train_loss=statistics.fmean(window),
            steps=len(losses),
            stopped_early=stopped_early,
            losses=losses,
            tokens=tokens,
            clip_bit=clip_bit,
        )

    @staticmethod
    def _extract(layers: dict[str, Any], manifest: RoundManifest) -> dict[str, torch.Tensor]:
        delta: dict[str, torch.Tensor] = {}
        for path, module in sorted(layers.items()):
            delta[path + B_SUFFIX] = module.lora_B["default"].weight.detach().float().cpu().clone()
            if manifest.lora_aggregation != "frozen_a":
                a = module.lora_A["default"].weight
                delta[path + A_SUFFIX] = a.detach().float().cpu().clone()
        return delta
