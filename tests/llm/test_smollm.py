"""Integration on the real SmolLM2-135M-Instruct in 4-bit NF4: the model-quality sanity checks."""

import pytest
import torch

from hearthnet.fedlearn.lora import complete_adapter
from hearthnet.fedlearn.peft_adapter import write_peft_adapter
from hearthnet.fedlearn.trainer import QLoRATrainer
from hearthnet.llm.quant import pack_as_inference
from tests.helpers import loaded_service

STREETS = [
    "Rheinstraße",
    "Hafenweg",
    "Marktplatz",
    "Kirchgasse",
    "Deichweg",
    "Mühlenstraße",
    "Bahnhofstraße",
    "Schulweg",
]
KINDS = ["Kellerbrand", "Ölspur", "Wasserschaden", "Baum auf Fahrbahn", "Türöffnung"]


def report(i: int) -> str:
    return (
        f"Einsatzbericht {100 + i}: Die Freiwillige Feuerwehr Kleve rückte um "
        f"{8 + i % 12}:{(i * 7) % 60:02d} Uhr zur {STREETS[i % len(STREETS)]} aus. "
        f"Meldung: {KINDS[i % len(KINDS)]}. Eingesetzt waren {3 + i % 5} Fahrzeuge."
    )


TRAIN = [report(i) for i in range(24)]
HELD_OUT = [report(i) for i in range(40, 46)]
GENERIC_HELD_OUT = [
    "The weather today is sunny with a light breeze from the west.",
    "Please remember to bring your library books back by Friday.",
]


@pytest.fixture(scope="module")
def smollm(smollm_dir, tmp_path_factory):
    return loaded_service(smollm_dir, tmp_path_factory.mktemp("node"))


def manifest_for(make_manifest, svc, **kw):
    fields = {
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_target_modules": ("q_proj", "v_proj"),
        "batch_size": 4,
        "learning_rate": 2e-3,
        "clip_norm": 0.0,
        "base_model_sha": svc.base_model_sha,
        "base_model_id": svc.base_model_id,
        **kw,
    }
    return make_manifest(**fields).manifest


def test_train_apply_and_evaluate(smollm, make_manifest, tmp_path):
    from peft import PeftModel

    from hearthnet.llm.model import load_4bit

    manifest = manifest_for(make_manifest, smollm, train_steps=30)
    result = QLoRATrainer(smollm.model_dir).train(manifest, TRAIN)
    assert result.steps >= 10
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5  # training loss fell
    adapter = complete_adapter(result.delta, manifest, smollm.model_shapes)
    sha = "ab" * 32
    directory = write_peft_adapter(adapter, manifest, smollm.base_model_id, tmp_path / sha)
    smollm.register_adapter(sha, directory)

    base_in = smollm.perplexity(HELD_OUT)  # the base runs first, as in the demo
    # After inference an AVX512-BF16 CPU holds the layers packed; put them so on any CPU, so the
    # adapter below is loaded into a used model wherever this runs (tests/llm/test_quant.py).
    pack_as_inference(smollm._model)
    tuned_in = smollm.perplexity(HELD_OUT, sha)
    base_out, tuned_out = (
        smollm.perplexity(GENERIC_HELD_OUT),
        smollm.perplexity(GENERIC_HELD_OUT, sha),
    )
    assert tuned_in < 0.5 * base_in  # in-domain held-out perplexity improves, by far
    assert tuned_out <= 2 * base_out  # no blow-up on text it was not tuned on
    assert smollm.perplexity(HELD_OUT) == base_in  # applying an adapter left the base alone

    # Stock peft loads the stored directory and agrees with the service.
    ref = PeftModel.from_pretrained(load_4bit(smollm.model_dir, "cpu"), str(directory))
    ids = smollm.tokenizer(HELD_OUT[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(
            smollm._run(sha, lambda m: m(input_ids=ids).logits), ref(input_ids=ids).logits
        )

    # Two sessions, different adapters, independent: interleaving changes neither's output.
    plain, tuned = smollm.open_session(), smollm.open_session(adapter_sha=sha)
    prompt = "Schreibe einen kurzen Einsatzbericht."
    b = tuned.generate(prompt, max_new_tokens=24)
    a = plain.generate(prompt, max_new_tokens=24)
    assert tuned.generate(prompt, max_new_tokens=24) == b
    assert plain.generate(prompt, max_new_tokens=24) == a


def test_ten_steps_on_synthetic_text_lower_the_loss(smollm, make_manifest):
    manifest = manifest_for(make_manifest, smollm, train_steps=10, learning_rate=3e-3)
    result = QLoRATrainer(smollm.model_dir).train(manifest, TRAIN[:8])
    assert result.steps == 10 and result.losses[-1] < result.losses[0]
