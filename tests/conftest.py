import os

import pytest
from hypothesis import HealthCheck, settings

from hearthnet.identity import NodeIdentity

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property tests draw the same examples on every run and machine: derandomised (each test seeded
# from its own hash), no example database (`.hypothesis/` cannot replay an old failure on one
# machine only), no deadline or too-slow check (a busy machine's timing must not decide). A
# failure prints the falsifying example and its `@reproduce_failure` blob.
# `HYPOTHESIS_PROFILE=explore` (or `--hypothesis-profile=explore`) searches with fresh random
# seeds instead, to look for new failures; pin one that turns up with `@example`.
settings.register_profile(
    "hearthnet",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", parent=settings.get_profile("hearthnet"), derandomize=False, database=None
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "hearthnet"))


def _without_local_constants() -> None:
    """Hypothesis also draws constants it finds in whichever project modules are imported by
    then, so a derandomised test drew other examples alone than in the whole suite (seed=1024
    vs 512 in test_robust.py). Only its built-in constants remain: same examples whatever runs
    first. A private hook — fail loudly if an upgrade moves it."""
    from hypothesis.internal.conjecture import providers

    if not callable(getattr(providers, "_get_local_constants", None)):
        raise RuntimeError("hypothesis moved _get_local_constants: update tests/conftest.py")
    empty = providers.Constants()
    providers._get_local_constants = lambda: empty


_without_local_constants()

# Fixtures that load the real model: a test reaching one, directly or through another fixture,
# is marked `slow` here, so a new real-model test cannot forget the mark.
REAL_MODEL_FIXTURES = frozenset({"smollm_dir"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_report_header(config):
    """Which CPU paths of the dependencies this run takes (bitsandbytes packs 4-bit weights
    only on AVX512-BF16 CPUs; tests/llm/test_quant.py drives that path on every CPU)."""
    from hearthnet.llm.quant import cpu_features

    f = cpu_features()
    return (
        f"cpu: torch {f['torch_cpu_capability']}, flags {' '.join(f['flags']) or '-'}, "
        f"bitsandbytes CPU packing {'on' if f['bitsandbytes_cpu_packing'] else 'off'}"
    )


@pytest.fixture
def identity() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    """The real SmolLM2-135M-Instruct, converted once from the bundled GGUF for this session."""
    from hearthnet.llm import model as M

    cache = tmp_path_factory.mktemp("models")
    source = M.resolve_source(None)
    return M.model_dir(source, cache, M.weights_sha(source, cache))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny randomly initialised Llama with SmolLM2's tokenizer: fast unit tests of the real
    code paths (4-bit loading, peft, generation)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hearthnet.llm.model import bundled_gguf

    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
