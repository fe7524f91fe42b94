"""bitsandbytes' CPU weight packing: driven on every CPU, never allowed to change the model.

On a CPU with AVX512-BF16 a 4-bit layer packs itself on its first inference forward; elsewhere
it never does. `pack_as_inference` performs that same conversion (plain torch) so that these tests
exercise the packed state whatever CPU runs them; only the packed matmul needs the feature, and
the tests below never run it on a CPU without it.
"""

import pytest
import torch

from hearthnet.config import LLMSection
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.peft_adapter import write_peft_adapter
from hearthnet.llm.model import load_4bit
from hearthnet.llm.quant import (
    cpu_packing_supported,
    pack_as_inference,
    packed_layers,
    set_cpu_packing,
    unpack,
)
from hearthnet.llm.service import LLMService
from tests.llm.test_service import random_adapter


def layer_states(model):
    from bitsandbytes.nn.modules import Linear4bit

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            state = module.weight.quant_state
            out[name] = (
                module.weight.data.clone(),
                state.absmax.clone(),
                state.dtype,
                state.nested,
                tuple(state.shape),
            )
    return out


def assert_same_layers(got, want):
    assert got.keys() == want.keys()
    for name, (weight, absmax, dtype, nested, shape) in want.items():
        g = got[name]
        assert torch.equal(g[0], weight), name
        assert g[1].dtype == absmax.dtype and g[1].shape == absmax.shape, name
        assert torch.equal(g[1], absmax), name
        assert g[2:] == (dtype, nested, shape), name


def ids_for(directory):
    from hearthnet.llm.model import load_tokenizer

    tokenizer = load_tokenizer(directory)
    return tokenizer("The siren test happens on the first Saturday.", return_tensors="pt")[
        "input_ids"
    ]


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_state_dict_of_a_packed_model_restores_every_layer_exactly(tiny_model_dir):
    model = load_4bit(tiny_model_dir, "cpu")
    before = layer_states(model)
    assert pack_as_inference(model) == len(before) > 0
    assert packed_layers(model) == len(before)
    # What peft wrapping, adapter loading, saving and hashing all do first.
    model.state_dict()
    assert packed_layers(model) == 0
    assert_same_layers(layer_states(model), before)


def test_wrapping_a_used_model_leaves_the_base_unchanged(tiny_model_dir, adapter_dirs):
    from peft import PeftModel

    ids = ids_for(tiny_model_dir)
    want = logits(load_4bit(tiny_model_dir, "cpu"), ids)
    used = load_4bit(tiny_model_dir, "cpu")
    logits(used, ids)  # a real inference forward: packs on an AVX512-BF16 CPU
    pack_as_inference(used)  # and the same layout on every other CPU
    # Loading an adapter reads the model's state dict (what LLMService does on first use).
    peft = PeftModel.from_pretrained(used, str(next(iter(adapter_dirs.values()))))
    peft.eval()
    with peft.disable_adapter():
        assert torch.equal(logits(peft, ids), want)


@pytest.fixture
def adapter_dirs(tiny_model_dir, make_manifest, tmp_path):
    from hearthnet.llm.model import linear_shapes

    signed = make_manifest(lora_rank=4, lora_target_modules=("q_proj", "v_proj"))
    shapes = linear_shapes(tiny_model_dir)
    return {
        name * 32: write_peft_adapter(
            random_adapter(signed.manifest, shapes, seed, scale=0.5),
            signed.manifest,
            "tiny",
            tmp_path / name,
        )
        for name, seed in (("c1", 1), ("c2", 2))
    }


def fresh_reference(tiny_model_dir, adapter_dir, ids):
    """Stock peft on a model that has run nothing: the numbers to match."""
    from peft import PeftModel

    return logits(
        PeftModel.from_pretrained(load_4bit(tiny_model_dir, "cpu"), str(adapter_dir)), ids
    )


def test_service_adapters_on_a_used_model_match_stock_peft_in_any_order(
    tiny_model_dir, adapter_dirs, tmp_path
):
    ids = ids_for(tiny_model_dir)
    base_want = logits(load_4bit(tiny_model_dir, "cpu"), ids)
    want = {sha: fresh_reference(tiny_model_dir, d, ids) for sha, d in adapter_dirs.items()}
    first, second = sorted(adapter_dirs)

    svc = LLMService(LLMSection(base_model=tiny_model_dir, device="cpu"), tmp_path / "node")
    svc.load()
    for sha, directory in adapter_dirs.items():
        svc.register_adapter(sha, directory)

    def run(sha):
        return svc._run(sha, lambda m: m(input_ids=ids).logits)

    assert torch.equal(run(None), base_want)  # evaluate the base first, as the demo does
    pack_as_inference(svc._model)  # the state that forward leaves on an AVX512-BF16 CPU
    for sha in (first, None, second, first, None, second):
        got = run(sha)
        assert torch.equal(got, base_want if sha is None else want[sha]), sha
    # Saving the adapters (another state-dict read) changes nothing either.
    pack_as_inference(svc._model)
    svc._peft.save_pretrained(str(tmp_path / "saved"))
    assert torch.equal(run(second), want[second])
    assert torch.equal(run(None), base_want)


def test_a_layout_that_does_not_invert_is_refused(tiny_model_dir):
    model = load_4bit(tiny_model_dir, "cpu")
    pack_as_inference(model)
    from bitsandbytes.nn.modules import Linear4bit

    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    layer.weight.data[0, 0] ^= 0xFF  # a packing this code does not know how to undo
    with pytest.raises(HearthnetError) as exc:
        model.state_dict()
    assert exc.value.code is ErrorCode.MODEL_UNAVAILABLE
    assert "bitsandbytes" in exc.value.message
    # Refused every time, never half restored: the layer stays packed as it was.
    assert packed_layers(model) == len(layer_states(model))
    with pytest.raises(HearthnetError) as exc:
        model.state_dict()
    assert exc.value.code is ErrorCode.MODEL_UNAVAILABLE


def test_the_packed_path_is_taken_exactly_where_the_cpu_has_it(tiny_model_dir):
    model = load_4bit(tiny_model_dir, "cpu")
    ids = ids_for(tiny_model_dir)
    total = len(layer_states(model))
    unpacked_want = logits(load_4bit(tiny_model_dir, "cpu").train(), ids)  # training: never packs
    if cpu_packing_supported():
        packed_out = logits(model, ids)
        assert packed_layers(model) == total
        # The packed matmul computes in bfloat16: close to the unpacked one, not equal.
        torch.testing.assert_close(packed_out, unpacked_want, atol=0.5, rtol=0.05)
        set_cpu_packing(model, False)
        assert packed_layers(model) == 0
        assert torch.equal(logits(model, ids), unpacked_want)
        assert packed_layers(model) == 0
        set_cpu_packing(model, True)
        logits(model, ids)
        assert packed_layers(model) == total
        unpack(model)
        assert packed_layers(model) == 0
    else:
        assert torch.equal(logits(model, ids), unpacked_want)
        assert packed_layers(model) == 0
        with pytest.raises(HearthnetError) as exc:
            set_cpu_packing(model, True)
        assert exc.value.code is ErrorCode.MODEL_UNAVAILABLE


def test_guard_refuses_a_model_that_already_ran(tiny_model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hearthnet.llm.quant import guard_cpu_packing

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    raw = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), quantization_config=quant, device_map="cpu"
    )
    pack_as_inference(raw)  # packed before anyone recorded its scales: too late to guard
    with pytest.raises(HearthnetError) as exc:
        guard_cpu_packing(raw)
    assert exc.value.code is ErrorCode.MODEL_UNAVAILABLE
    guarded = load_4bit(tiny_model_dir, "cpu")
    pack_as_inference(guarded)
    assert guard_cpu_packing(guarded) == packed_layers(guarded)  # guarding twice is harmless
