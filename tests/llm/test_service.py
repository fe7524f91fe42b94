import asyncio
import time

import pytest
import torch

from hearthnet.config import FedLearnConfig
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.lora import A_SUFFIX, B_SUFFIX, target_layers
from hearthnet.llm.adapters import from_peft_key, to_peft_key, write_peft_adapter
from hearthnet.llm.service import LLMService
from tests.helpers import loaded_service, raises_code


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    return loaded_service(tiny_model_dir, tmp_path_factory.mktemp("node"))


def random_adapter(manifest, shapes, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, (fan_out, fan_in) in target_layers(manifest, shapes).items():
        out[path + A_SUFFIX] = torch.randn(manifest.lora_rank, fan_in, generator=gen) * scale
        out[path + B_SUFFIX] = torch.randn(fan_out, manifest.lora_rank, generator=gen) * scale
    return out


def test_peft_key_mapping():
    key = "model.layers.3.self_attn.q_proj.lora_B"
    assert to_peft_key(key) == "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"
    assert from_peft_key(to_peft_key(key)) == key
    live = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert from_peft_key(live) == "model.layers.3.self_attn.q_proj.lora_A"
    with raises_code(ErrorCode.DELTA_INVALID):
        to_peft_key("model.layers.0.weight")


def test_sessions_use_their_own_adapters(service, make_manifest, tmp_path):
    from peft import PeftModel

    from hearthnet.llm.model import load_4bit

    signed = make_manifest(lora_rank=4, lora_target_modules=("q_proj", "v_proj"))
    dirs = {}
    for name, seed in (("a1", 1), ("a2", 2)):
        sha = name * 32
        dirs[sha] = write_peft_adapter(
            random_adapter(signed.manifest, service.model_shapes, seed),
            signed.manifest,
            "tiny",
            tmp_path / sha,
        )
        service.register_adapter(sha, dirs[sha])
    base = service.open_session()
    s1 = service.open_session(adapter_sha="a1" * 32)
    s2 = service.open_session()
    s2.apply_adapter("a2" * 32)
    prompt = "Tell me about the harvest festival."
    out_base, out1, out2 = (s.generate(prompt, max_new_tokens=8) for s in (base, s1, s2))
    assert len({out_base, out1, out2}) == 3
    # Interleaving does not leak one session's adapter into another.
    assert s1.generate(prompt, max_new_tokens=8) == out1
    assert base.generate(prompt, max_new_tokens=8) == out_base
    assert s2.generate(prompt, max_new_tokens=8) == out2
    # Stock peft loads the stored adapter and produces the same logits as the session.
    ref = PeftModel.from_pretrained(load_4bit(service.model_dir, "cpu"), str(dirs["a1" * 32]))
    ids = service.tokenizer("hello there", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want = ref(input_ids=ids).logits
        got = service._run("a1" * 32, lambda m: m(input_ids=ids).logits)
    torch.testing.assert_close(got, want)
    assert {a["sha"] for a in service.adapters()} >= {"a1" * 32, "a2" * 32}
    with pytest.raises(HearthnetError) as exc:
        service.open_session(adapter_sha="0" * 64)
    assert exc.value.code is ErrorCode.ADAPTER_NOT_FOUND
    service.set_node_adapter("a2" * 32)
    assert service.open_session().adapter_sha == "a2" * 32
    service.set_node_adapter(None)
    for session in (base, s1, s2):
        session.close()


def test_perplexity_and_adapter_effect(service):
    texts = ["The siren test happens on the first Saturday of each month."]
    ppl = service.perplexity(texts)
    assert 1.0 < ppl < 1e6
    assert service.perplexity(texts) == ppl
    with raises_code(ErrorCode.BAD_REQUEST):
        service.perplexity([])


def test_resources_and_base_model_checks(service, make_manifest):
    small = make_manifest(lora_rank=4).manifest
    est = service.check_resources(small)
    assert est.vram_mb > 0 and est.disk_mb >= 0
    big = make_manifest(
        lora_rank=64, batch_size=256, lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    ).manifest
    tight = LLMService(
        service.settings, service.cache_root.parent, FedLearnConfig(training_vram_budget_mb=1)
    )
    tight.prepare()
    with pytest.raises(HearthnetError) as exc:
        tight.check_resources(big)
    assert exc.value.code is ErrorCode.INSUFFICIENT_RESOURCES
    assert service.estimate_training_resources(big).vram_mb > est.vram_mb
    with pytest.raises(HearthnetError) as exc:
        service.check_base_model(small)  # the draft's sha is not this model's
    assert exc.value.code is ErrorCode.BASE_MODEL_MISMATCH
    service.check_base_model(small.model_copy(update={"base_model_sha": service.base_model_sha}))


async def test_training_in_a_thread_does_not_block_the_event_loop(service, make_manifest):
    from hearthnet.fedlearn.trainer import QLoRATrainer

    manifest = make_manifest(lora_rank=4, train_steps=40, batch_size=4).manifest
    texts = ["The fire brigade meets on Tuesday evenings at the old station."] * 8
    task = asyncio.ensure_future(
        asyncio.to_thread(
            QLoRATrainer(service.model_dir).train, manifest, texts, progress=lambda *a: None
        )
    )
    worst, ticks, began = 0.0, 0, time.perf_counter()
    while not task.done():
        start = time.perf_counter()
        await asyncio.sleep(0.01)
        worst = max(worst, time.perf_counter() - start - 0.01)
        ticks += 1
    await task
    elapsed = time.perf_counter() - began
    # The loop kept turning while training ran: no stall near a ping timeout (20 s), and on
    # average a turn at least every 50 ms. (Loading the model in the thread holds the GIL in C
    # code for up to ~0.3 s at a time here.)
    assert worst < 1.0
    assert ticks >= elapsed / 0.05
