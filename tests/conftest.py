import os

import pytest

from hearthnet.identity import NodeIdentity

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
