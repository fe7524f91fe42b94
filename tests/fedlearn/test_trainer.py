import math
import random
import statistics
import threading

import pytest
import torch

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.delta import validate_delta
from hearthnet.fedlearn.lora import derive_lora_a
from hearthnet.fedlearn.privacy import NoiseSource, global_norm
from hearthnet.fedlearn.trainer import QLoRATrainer, plateaued
from hearthnet.llm.model import linear_shapes

TEXTS = [
    "The fire brigade of Kleve meets every Tuesday evening at the old station.",
    "Sandbags are stored in the shed behind the town hall for the spring floods.",
    "The siren test happens on the first Saturday of each month at noon.",
    "Volunteers check the hoses and the pump before the harvest festival.",
] * 3


def first_stop(losses: list[float], train_steps: int) -> int | None:
    """The step at which the trainer would stop early on these batch losses, if any."""
    for step in range(1, len(losses) + 1):
        if plateaued(losses[:step], train_steps=train_steps):
            return step
    return None


def old_rule_fires(losses: list[float]) -> bool:
    return any(
        statistics.fmean(losses[t - 10 : t - 5]) - statistics.fmean(losses[t - 5 : t])
        < 0.002 * statistics.fmean(losses[t - 10 : t - 5])
        for t in range(10, len(losses))
    )


def noisy_falling(seed: int, steps: int, sigma: float) -> list[float]:
    """Batch losses still falling (by ~3% over the last 40% of the run) under batch noise."""
    rng = random.Random(seed)
    return [2.2 + 0.5 * math.exp(-2 * t / steps) + rng.gauss(0, sigma) for t in range(1, steps + 1)]


def falls_then_flat(seed: int, steps: int, sigma: float, flat_from: int = 10) -> list[float]:
    rng = random.Random(seed)
    return [2.2 + 0.05 * max(flat_from - t, 0) + rng.gauss(0, sigma) for t in range(1, steps + 1)]


@pytest.mark.parametrize(
    ("steps", "sigma"), [(30, 0.1), (30, 0.25), (100, 0.1), (100, 0.25), (300, 0.1)]
)
def test_plateau_rule_trains_on_through_noise_while_the_loss_falls(steps, sigma):
    runs = {seed: noisy_falling(seed, steps, sigma) for seed in range(40)}
    # the old rule (mean of the last 5 losses improved < 0.2% on the 5 before) fired on these
    assert sum(map(old_rule_fires, runs.values())) >= 36
    stops = {seed: first_stop(losses, steps) for seed, losses in runs.items()}
    assert all(at is None for at in stops.values()), {s: a for s, a in stops.items() if a}


def test_plateau_rule_ignores_a_first_batch_below_the_recent_ones():
    # the round that prompted the rule: stopped at step 10 with recent losses above the first
    losses = [2.31, 2.9, 2.55, 2.8, 2.4, 2.75, 2.5, 2.62, 2.7, 2.65]
    losses += [2.6 - 0.01 * t + 0.15 * (-1) ** t for t in range(20)]
    assert first_stop(losses, 30) is None


@pytest.mark.parametrize(("steps", "expected"), [(30, 23), (100, 60), (300, 180)])
def test_plateau_rule_stops_on_a_flat_quiet_loss(steps, expected):
    # window 12 / 40 / 120, patience 3, earliest 18 / 60 / 180; flat from step 10
    for seed in range(5):
        assert first_stop(falls_then_flat(seed, steps, 0.002), steps) == expected


def test_plateau_rule_never_stops_before_the_minimum_share_or_on_the_last_step():
    assert first_stop([2.0] * 30, 30) == 18  # 60% of 30; the old rule said 10
    assert first_stop([2.0] * 10, 10) is None  # the window needs 10 losses and 3 checks
    assert plateaued([2.0] * 29, train_steps=30)
    assert not plateaued([2.0] * 30, train_steps=30)  # the last step: nothing left to save
    assert not plateaued([2.0] * 17, train_steps=30)


def test_plateau_rule_counts_no_non_finite_loss_as_flat():
    assert not plateaued([2.0] * 20 + [math.nan], train_steps=30)
    assert not plateaued([2.0] * 20 + [math.inf], train_steps=30)


def test_trains_lowers_loss_and_extracts_a_valid_delta(make_manifest, tiny_model_dir):
    signed = make_manifest(
        lora_target_modules=("q_proj", "v_proj"),
        lora_rank=4,
        train_steps=10,
        learning_rate=5e-3,
        batch_size=2,
        clip_norm=0.0,
    )
    steps_seen = []
    result = QLoRATrainer(tiny_model_dir).train(
        signed.manifest, TEXTS, progress=lambda s, t, loss: steps_seen.append(s)
    )
    assert result.steps == 10 and steps_seen == list(range(1, 11))
    assert result.num_samples == len(TEXTS)
    assert result.losses[-1] < result.losses[0]
    assert result.tokens > 0
    shapes = linear_shapes(tiny_model_dir)
    validate_delta(result.delta, signed.manifest, shapes)
    assert all(k.endswith(".lora_B") for k in result.delta)  # frozen_a sends B only
    assert any(float(t.abs().max()) > 0 for t in result.delta.values())  # B moved from zero


def test_training_stops_early_on_a_flat_loss_and_reports_its_steps(make_manifest, tiny_model_dir):
    # full batches and a learning rate too small to move anything: the loss is flat
    signed = make_manifest(
        lora_rank=4, train_steps=30, learning_rate=1e-9, batch_size=len(TEXTS), clip_norm=0.0
    )
    result = QLoRATrainer(tiny_model_dir).train(signed.manifest, TEXTS, progress=lambda *a: None)
    assert result.stopped_early and result.steps == 18 == len(result.losses)  # 60% of 30


def test_a_starts_from_the_seed_and_frozen_a_keeps_it(make_manifest, tiny_model_dir):
    frozen = make_manifest(lora_rank=4, train_steps=3, clip_norm=0.0)
    trainer = QLoRATrainer(tiny_model_dir)
    model, _tok, layers = trainer.build(frozen.manifest)
    path = "model.layers.1.self_attn.q_proj"
    a = layers[path].lora_A["default"].weight
    assert torch.equal(a.detach(), derive_lora_a(frozen.manifest.seed, path, 4, 64))
    assert not a.requires_grad
    assert torch.count_nonzero(layers[path].lora_B["default"].weight) == 0
    del model
    both = make_manifest(
        lora_rank=4, train_steps=3, clip_norm=0.0, lora_aggregation="fedavg_ab", learning_rate=1e-2
    )
    result = trainer.train(both.manifest, TEXTS)
    validate_delta(result.delta, both.manifest, linear_shapes(tiny_model_dir))
    trained_a = result.delta[path + ".lora_A"]
    assert not torch.equal(trained_a, derive_lora_a(both.manifest.seed, path, 4, 64))


def test_clip_and_dp_noise_are_applied(make_manifest, tiny_model_dir):
    signed = make_manifest(lora_rank=4, train_steps=4, learning_rate=5e-2, clip_norm=1e-3)
    clipped = QLoRATrainer(tiny_model_dir).train(signed.manifest, TEXTS)
    assert global_norm(clipped.delta) <= 1e-3
    noisy_manifest = make_manifest(
        lora_rank=4, train_steps=4, learning_rate=5e-2, clip_norm=1e-3, dp_noise_scale=0.5
    )
    noisy = QLoRATrainer(tiny_model_dir).train(
        noisy_manifest.manifest, TEXTS, noise_rng=NoiseSource(bytes(32))
    )
    assert global_norm(noisy.delta) > 10 * 1e-3  # noise of std 0.5 dominates the clipped delta


def test_cancel_stops_between_steps(make_manifest, tiny_model_dir):
    signed = make_manifest(lora_rank=4, train_steps=50)
    cancel = threading.Event()

    def progress(step, _total, _loss):
        if step == 2:
            cancel.set()

    with pytest.raises(HearthnetError) as exc:
        QLoRATrainer(tiny_model_dir).train(signed.manifest, TEXTS, cancel=cancel, progress=progress)
    assert exc.value.code is ErrorCode.CANCELLED and "step 3" in exc.value.message


def test_no_usable_samples(make_manifest, tiny_model_dir):
    signed = make_manifest(lora_rank=4, train_steps=2)
    with pytest.raises(HearthnetError) as exc:
        QLoRATrainer(tiny_model_dir).train(signed.manifest, ["a"])
    assert exc.value.code is ErrorCode.DATA_INVALID


def test_a_diverged_delta_is_refused(make_manifest, tiny_model_dir, monkeypatch):
    """Real training whose extracted weights hold a NaN (as a diverged run would)."""
    signed = make_manifest(lora_rank=4, train_steps=2, clip_norm=0.0)
    real = QLoRATrainer._extract

    def diverged(layers, manifest):
        delta = real(layers, manifest)
        delta[sorted(delta)[0]][0, 0] = float("nan")
        return delta

    monkeypatch.setattr(QLoRATrainer, "_extract", staticmethod(diverged))
    with pytest.raises(HearthnetError) as exc:
        QLoRATrainer(tiny_model_dir).train(signed.manifest, TEXTS, progress=lambda *_: None)
    assert exc.value.code is ErrorCode.DATA_INVALID
