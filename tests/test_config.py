import os
from pathlib import Path

import pytest

from hearthnet import constants as C
from hearthnet.config import FedLearnConfig, load_config
from hearthnet.errors import ErrorCode, HearthnetError
from tests.helpers import raises_code

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_minimal_config_has_spec_defaults(tmp_path):
    cfg = load_config(write(tmp_path, '[node]\nname = "a"\ndata_dir = "d"\n'))
    assert cfg.data_dir == (tmp_path / "d").resolve()
    assert cfg.experimental.fedlearn is False
    assert cfg.listen.port == C.DEFAULT_LISTEN_PORT
    assert cfg.fedlearn == FedLearnConfig()
    f = cfg.fedlearn
    assert (f.max_lora_rank, f.max_lora_target_modules, f.max_train_steps) == (64, 8, 1000)
    assert (f.max_round_participants, f.min_round_participants) == (32, 3)
    assert (f.dp_noise_scale_default, f.clip_norm_default) == (0.0, 24.0)
    assert (f.clip_policy_default, f.clip_quantile_default, f.clip_learning_rate_default) == (
        "adaptive",
        0.5,
        0.2,
    )
    assert f.clip_count_noise_default is None
    assert f.submission_max_bytes == 64 * 1024 * 1024
    assert not f.require_secure_aggregation and not f.auto_apply_aggregated
    assert (f.training_vram_budget_mb, f.training_disk_budget_mb) == (8192, 4096)
    assert cfg.llm.base_model is None


def test_fedlearn_config_is_frozen():
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        FedLearnConfig().max_lora_rank = 8  # type: ignore[misc]


def test_example_config_is_valid_and_documents_every_key():
    example = ROOT / "config" / "node.example.toml"
    cfg = load_config(example)
    text = example.read_text()
    sections = {
        "node": cfg.node,
        "listen": cfg.listen,
        "trust": cfg.trust,
        "log": cfg.log,
        "experimental": cfg.experimental,
        "fedlearn": cfg.fedlearn,
        "llm": cfg.llm,
    }
    for section, model in sections.items():
        assert f"[{section}]" in text
        for key in type(model).model_fields:
            assert f"{key} =" in text, f"{section}.{key} undocumented"
    assert "[[peers]]" in text


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[node]\nname = "a"\n', "node.data_dir", "Field required"),
        ('[node]\nname = "a"\ndata_dir = "d"\nbogus = 1\n', "node.bogus", "unknown key"),
        (
            '[node]\nname = "a"\ndata_dir = "d"\n[fedlearn]\nmax_lora_rank = 65\n',
            "fedlearn.max_lora_rank",
            "less than or equal to 64",
        ),
        (
            '[node]\nname = "a"\ndata_dir = "d"\n[fedlearn]\nmax_train_steps = 0\n',
            "fedlearn.max_train_steps",
            "greater than or equal to 1",
        ),
        (
            '[node]\nname = "a"\ndata_dir = "d"\n[fedlearn]\nclip_norm_default = 0.0\n',
            "fedlearn.clip_norm_default",
            "greater than 0",
        ),
        (
            '[node]\nname = "a"\ndata_dir = "d"\n[fedlearn]\nsubmission_max_bytes = 67108865\n',
            "fedlearn.submission_max_bytes",
            "less than or equal",
        ),
        ('[node]\nname = "a"\ndata_dir = "d"\n[listen]\nport = 70000\n', "listen.port", "65535"),
        (
            '[node]\nname = "a"\ndata_dir = "d"\n[[peers]]\nurl = "http://x:1"\n',
            "peers.0.url",
            "wss://",
        ),
        (
            '[node]\nname = "a"\ndata_dir = "d"\n[[peers]]\nurl = "ws://x:1"\nany_node = true\n',
            "peers.0.url",
            "always TLS",
        ),
        ('[node]\nname = "a"\ndata_dir = "d"\n[[peers]]\nurl = "wss://x"\n', "peers.0.url", "port"),
        (
            '[node]\nname = "a"\ndata_dir = "d"\n[[peers]]\nurl = "wss://x:1"\n',
            "peers.0",
            "any_node = true",
        ),
        (
            '[node]\nname = "a"\ndata_dir = "d"\n[trust]\nroster = ["hnnope"]\n',
            "trust.roster.0",
            "malformed NodeID",
        ),
        ('[node]\nname = "a"\ndata_dir = "d"\n[log]\nformat = "xml"\n', "log.format", "console"),
        ('[node]\nname = "a b"\ndata_dir = "d"\n', "node.name", "pattern"),
        (
            '[node]\nname = "a"\ndata_dir = "d"\n[experimental]\nfedlearn = "yes"\n',
            "experimental.fedlearn",
            "boolean",
        ),
        (
            '[node]\nname = "a"\ndata_dir = "d"\n[fedlearn]\nenabled = true\n',
            "fedlearn.enabled",
            "unknown key",
        ),
    ],
)
def test_bad_config_names_key_and_reason(tmp_path, text, key, reason):
    with pytest.raises(HearthnetError) as exc:
        load_config(write(tmp_path, text))
    assert exc.value.code is ErrorCode.CONFIG_INVALID
    assert f"'{key}'" in exc.value.message
    assert reason in exc.value.message
    assert not (tmp_path / "d").exists()  # nothing created on disk


def test_min_above_max_participants_is_refused(tmp_path):
    text = (
        '[node]\nname="a"\ndata_dir="d"\n[fedlearn]\nmin_round_participants=9\n'
        "max_round_participants=4\n"
    )
    with raises_code(ErrorCode.CONFIG_INVALID) as exc:
        load_config(write(tmp_path, text))
    assert "min_round_participants" in exc.value.message


def test_malformed_toml_missing_and_oversized_files(tmp_path):
    with raises_code(ErrorCode.CONFIG_INVALID) as exc:
        load_config(write(tmp_path, "[node\nname="))
    assert "not valid TOML" in exc.value.message
    with raises_code(ErrorCode.CONFIG_INVALID) as exc:
        load_config(tmp_path / "nope.toml")
    assert "not found" in exc.value.message
    big = tmp_path / "big.toml"
    with open(big, "wb") as fh:
        fh.truncate(C.CONFIG_FILE_MAX_BYTES + 1)
    with raises_code(ErrorCode.CONFIG_INVALID) as exc:
        load_config(big)
    assert "too large" in exc.value.message


def test_relative_paths_resolve_against_config_dir(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    cfg = load_config(
        write(sub, '[node]\nname="a"\ndata_dir="../data"\n[llm]\nbase_model="m.gguf"\n')
    )
    assert cfg.data_dir == (tmp_path / "data").resolve()
    assert cfg.llm.base_model == (sub / "m.gguf").resolve()
    assert os.path.isabs(cfg.key_path)


def test_members_only_roster(tmp_path, identity):
    other = "hn" + identity.node_id[2:]
    cfg = load_config(
        write(
            tmp_path,
            (f'[node]\nname="a"\ndata_dir="d"\n[trust]\nmembers_only=true\nroster=["{other}"]\n'),
        )
    )
    assert cfg.trust.allows(identity.node_id)
    cfg2 = load_config(
        write(tmp_path, '[node]\nname="a"\ndata_dir="d"\n[trust]\nmembers_only=true\n')
    )
    assert not cfg2.trust.allows(identity.node_id)
