"""Node start and stop: what a start costs and what a failed start leaves behind (issue 12)."""

import asyncio

import pytest
from structlog.testing import capture_logs

from hearthnet.config import config_from_dict
from hearthnet.constants import EVENTLOG_FILE_NAME
from hearthnet.errors import ErrorCode
from hearthnet.eventlog import EventLog
from hearthnet.identity import NodeIdentity
from hearthnet.llm import model as M
from hearthnet.node import Node
from tests.helpers import raises_code


def _config(tmp_path, **llm):
    return config_from_dict(
        {
            "node": {"name": "n", "data_dir": str(tmp_path / "n"), "network_id": "test-net"},
            "listen": {"host": "127.0.0.1", "port": 0},
            "experimental": {"fedlearn": True},
            "llm": {"enabled": False, "device": "cpu", **llm},
        },
        tmp_path,
    )


@pytest.mark.slow  # converts the real SmolLM2 GGUF (~20 s) without the smollm_dir fixture
async def test_llm_off_start_does_not_convert_the_gguf_and_training_does(tmp_path):
    """A fedlearn node with [llm] off needs the base model's SHA and shapes at start, not its
    weights: the GGUF is not converted then (it took ~25 s), but when training first needs it;
    the shapes read from the GGUF's metadata are those of the converted model."""
    cache = tmp_path / "cache"
    node = Node(_config(tmp_path, cache_dir=str(cache)), NodeIdentity.generate())
    await node.start()
    try:
        llm = node.llm
        assert llm is not None and llm.tokenizer is None
        assert not (cache / llm.base_model_sha).exists()
        assert "model_dir" not in vars(llm)  # not converted yet
        converted = await asyncio.to_thread(lambda: llm.model_dir)  # as the participant does
        assert converted == cache / llm.base_model_sha and (converted / "config.json").is_file()
        assert llm.model_shapes == M.linear_shapes(converted)
        cfg = M.base_config(llm.source, cache, llm.base_model_sha)
        assert (llm.hidden_size, llm.num_layers) == (cfg["hidden_size"], cfg["num_hidden_layers"])
    finally:
        await node.stop()


async def test_a_failed_start_does_not_log_node_stopped(tmp_path):
    """A start that fails after the event log is open (here: no model where the config says)
    raises its code and leaves neither a "node stopped" line nor a node.stopped event."""
    config = _config(tmp_path, base_model=str(tmp_path / "missing.gguf"))
    node = Node(config, NodeIdentity.generate())
    with capture_logs() as logs, raises_code(ErrorCode.MODEL_UNAVAILABLE):
        await node.start()
    assert not {"node started", "node stopped"} & {entry["event"] for entry in logs}
    log = EventLog.open_readonly(config.data_dir / EVENTLOG_FILE_NAME, node.node_id)
    try:
        assert [e.type for e in await log.read(0)] == []
    finally:
        await log.close()


async def test_an_existing_data_directory_is_made_private(tmp_path, tiny_model_dir):
    config = _config(tmp_path, base_model=str(tiny_model_dir))
    config.data_dir.mkdir(mode=0o755)
    config.data_dir.chmod(0o755)  # an operator's mkdir, umask 022
    node = Node(config, NodeIdentity.generate())
    with capture_logs() as logs:
        await node.start()
    try:
        assert config.data_dir.stat().st_mode & 0o777 == 0o700
        assert "data directory made private" in {entry["event"] for entry in logs}
    finally:
        await node.stop()
