import threading

import pytest
import torch

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.delta import validate_delta
from hearthnet.fedlearn.lora import derive_lora_a
from hearthnet.fedlearn.privacy import global_norm
from hearthnet.fedlearn.trainer import QLoRATrainer, plateaued
from hearthnet.llm.model import linear_shapes

TEXTS = [
    "The fire brigade of Kleve meets every Tuesday evening at the old station.",
    "Sandbags are stored in the shed behind the town hall for the spring floods.",
    "The siren test happens on the first Saturday of each month at noon.",
    "Volunteers check the hoses and the pump before the harvest festival.",
] * 3


def test_plateau_rule():
    assert not plateaued([5.0, 4.0, 3.0])
    assert not plateaued([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], window=5)
    assert plateaued([2.0] * 10, window=5)
    assert plateaued([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.999], window=5)


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
        noisy_manifest.manifest, TEXTS, noise_rng=torch.Generator().manual_seed(1)
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
