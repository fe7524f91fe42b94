import json

import pytest

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.llm import model as M


def test_bundled_source_and_sha_are_cached(tmp_path):
    source = M.resolve_source(None)
    assert source.kind == "gguf" and source.model_id == "SmolLM2-135M-Instruct.Q4_1"
    sha = M.weights_sha(source, tmp_path)
    memo = next(tmp_path.glob("sha-*.json"))
    assert json.loads(memo.read_text())["sha"] == sha and len(sha) == 64
    data = json.loads(memo.read_text())
    data["sha"] = "f" * 64  # a memo with the same stamp is trusted: no re-hash at start
    memo.write_text(json.dumps(data))
    assert M.weights_sha(source, tmp_path) == "f" * 64


def test_hf_directory_source(tiny_model_dir, tmp_path):
    source = M.resolve_source(tiny_model_dir)
    assert source.kind == "hf" and M.model_dir(source, tmp_path, "x") == tiny_model_dir
    first = M.weights_sha(source, tmp_path)
    assert first == M.weights_sha(source, tmp_path / "elsewhere")  # stable across caches
    shapes = M.linear_shapes(tiny_model_dir)
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["model.layers.1.self_attn.v_proj"] == (32, 64)  # 2 KV heads of 16
    assert shapes["model.layers.0.mlp.down_proj"] == (64, 128)


@pytest.mark.parametrize("bad", ["missing.gguf", "not-a-model-dir"])
def test_bad_sources(tmp_path, bad):
    (tmp_path / "not-a-model-dir").mkdir()
    with pytest.raises(HearthnetError) as exc:
        M.resolve_source(tmp_path / bad)
    assert exc.value.code is ErrorCode.MODEL_UNAVAILABLE


def test_gguf_conversion_matches_transformers(smollm_dir):
    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 576
    assert "quantization_config" not in cfg
    assert (smollm_dir / "model.safetensors").is_file()
    assert M.linear_shapes(smollm_dir)["model.layers.29.self_attn.k_proj"] == (192, 576)


@pytest.mark.slow
def test_nodes_sharing_a_cache_convert_once_and_none_fails(tmp_path):
    """Several nodes on one machine share `[llm] cache_dir` and start a round at once: one
    converts the GGUF, the others wait for it instead of failing on its rename."""
    import concurrent.futures

    source = M.resolve_source(None)
    sha = M.weights_sha(source, tmp_path)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        dirs = list(pool.map(lambda _: M.model_dir(source, tmp_path, sha), range(3)))
    assert dirs == [tmp_path / sha] * 3 and (tmp_path / sha / "config.json").is_file()
    assert not list(tmp_path.glob(".convert-*"))  # no half-written copy left behind
