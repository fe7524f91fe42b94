"""PEFT adapter directories on disk (fedlearn/peft_adapter.py): what is at the path is what was
written, under the names stock PEFT loads."""

import pytest
import torch
from safetensors.torch import load_file

from hearthnet.errors import ErrorCode
from hearthnet.fedlearn.lora import A_SUFFIX, B_SUFFIX, target_layers
from hearthnet.fedlearn.peft_adapter import from_peft_key, to_peft_key, write_peft_adapter
from hearthnet.llm.model import linear_shapes
from tests.helpers import raises_code


def adapter(manifest, shapes, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, (fan_out, fan_in) in target_layers(manifest, shapes).items():
        out[path + A_SUFFIX] = torch.randn(manifest.lora_rank, fan_in, generator=gen)
        out[path + B_SUFFIX] = torch.randn(fan_out, manifest.lora_rank, generator=gen)
    return out


def stored(directory) -> dict[str, torch.Tensor]:
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    return {from_peft_key(k): v for k, v in tensors.items()}


def test_peft_key_mapping():
    key = "model.layers.3.self_attn.q_proj.lora_B"
    assert to_peft_key(key) == "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"
    assert from_peft_key(to_peft_key(key)) == key
    live = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert from_peft_key(live) == "model.layers.3.self_attn.q_proj.lora_A"
    with raises_code(ErrorCode.DELTA_INVALID):
        to_peft_key("model.layers.0.weight")


@pytest.fixture
def shapes(tiny_model_dir):
    return linear_shapes(tiny_model_dir)


def test_a_reused_path_serves_the_adapter_written_last(make_manifest, shapes, tmp_path):
    from peft import PeftConfig

    x_manifest = make_manifest(lora_rank=4, lora_target_modules=("q_proj", "v_proj")).manifest
    y_manifest = make_manifest(lora_rank=8, lora_target_modules=("q_proj",)).manifest
    x, y = adapter(x_manifest, shapes, 1), adapter(y_manifest, shapes, 2)
    target = tmp_path / "adapter"
    assert write_peft_adapter(x, x_manifest, "tiny", target) == target
    assert stored(target).keys() == x.keys()
    write_peft_adapter(y, y_manifest, "tiny", target)
    got = stored(target)
    assert got.keys() == y.keys() and all(torch.equal(got[k], y[k]) for k in y)
    config = PeftConfig.from_pretrained(str(target))
    assert config.r == 8 and set(config.target_modules) == {"q_proj"}
    # same manifest, other tensors: also replaced
    y2 = adapter(y_manifest, shapes, 3)
    write_peft_adapter(y2, y_manifest, "tiny", target)
    assert all(torch.equal(stored(target)[k], y2[k]) for k in y2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing left behind


def test_an_identical_directory_is_kept_and_a_damaged_one_rewritten(
    make_manifest, shapes, tmp_path
):
    manifest = make_manifest(lora_rank=4).manifest
    x = adapter(manifest, shapes, 1)
    target = write_peft_adapter(x, manifest, "tiny", tmp_path / "adapter")
    weights = target / "adapter_model.safetensors"
    before = weights.stat()
    write_peft_adapter(x, manifest, "tiny", target)
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # untouched
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + b"\0" * 8)  # one tensor's last values zeroed
    (target / "stray.bin").write_bytes(b"x")
    write_peft_adapter(x, manifest, "tiny", target)
    assert weights.read_bytes() == good and not (target / "stray.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_adapters_are_written_private(tmp_path, make_manifest):
    signed = make_manifest(lora_rank=4, lora_target_modules=("q_proj",))
    root = tmp_path / "adapters"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    write_peft_adapter({}, signed.manifest, "tiny", root / ("ab" * 32))
    assert root.stat().st_mode & 0o777 == 0o700
    assert (root / ("ab" * 32)).stat().st_mode & 0o077 == 0
