import asyncio
import time

import pytest
import torch

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.lora import A_SUFFIX, B_SUFFIX, target_layers
from hearthnet.fedlearn.peft_adapter import write_peft_adapter
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
