import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hearthnet.config import load_config
from hearthnet.eventlog import EventLog
from hearthnet.identity import NodeIdentity, is_node_id

HEARTHNET = shutil.which("hearthnet") or str(Path(sys.executable).with_name("hearthnet"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HEARTHNET, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", [[], ["init"], ["id"], ["events"]])
def test_help_on_every_command(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: hearthnet" in result.stdout


def test_init_id_and_events(tmp_path):
    data = tmp_path / "alice"
    result = run("init", "--data-dir", str(data), "--name", "alice", "--port", "7555")
    assert result.returncode == 0, result.stderr
    node_id = result.stdout.split()[2]
    assert is_node_id(node_id)
    assert stat.S_IMODE(os.stat(data / "node.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    cfg = load_config(data / "node.toml")
    assert (cfg.node.name, cfg.listen.port, cfg.data_dir) == ("alice", 7555, data.resolve())
    assert cfg.experimental.fedlearn is False

    result = run("id", "--config", str(data / "node.toml"))
    assert result.returncode == 0 and result.stdout.strip() == node_id

    assert run("events", "--config", str(data / "node.toml")).returncode == 0

    async def write_events() -> None:
        log = EventLog(data / "events.sqlite3", NodeIdentity.load(data / "node.key"))
        await log.append("fedlearn.round.announced", {"round": "r1"})
        await log.append("node.started", {})
        await log.close()

    asyncio.run(write_events())
    result = run("events", "--config", str(data / "node.toml"), "--type", "fedlearn.")
    assert result.returncode == 0
    assert "fedlearn.round.announced" in result.stdout and "node.started" not in result.stdout
    result = run("events", "--config", str(data / "node.toml"), "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seq"] for r in rows] == [1, 2] and rows[0]["actor"] == node_id
    result = run("events", "--config", str(data / "node.toml"), "--verify")
    assert result.returncode == 0 and "ok: 2 events verified" in result.stdout

    db = sqlite3.connect(data / "events.sqlite3")
    db.execute("UPDATE events SET payload = ? WHERE seq = 1", (b'{"round":"r2"}',))
    db.commit()
    db.close()
    result = run("events", "--config", str(data / "node.toml"), "--verify")
    assert result.returncode == 1 and "BROKEN at seq 1" in result.stdout


def test_events_verify_names_a_deleted_tail(tmp_path):
    """Rows deleted from the end leave a valid chain; the signed head checkpoint beside the log
    still names them (issue 13), and a missing checkpoint is reported, not passed."""
    data = tmp_path / "alice"
    assert run("init", "--data-dir", str(data)).returncode == 0
    config = str(data / "node.toml")

    async def write_events() -> None:
        log = EventLog(data / "events.sqlite3", NodeIdentity.load(data / "node.key"))
        for i in range(5):
            await log.append("test.event", {"i": i})
        await log.close()

    asyncio.run(write_events())
    db = sqlite3.connect(data / "events.sqlite3")
    db.execute("DELETE FROM events WHERE seq > 2")
    db.commit()
    db.close()
    result = run("events", "--config", config, "--verify")
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == (
        "BROKEN at seq 3: events 3..5 missing after the last one (seq 2): the log was truncated"
    )
    assert "Traceback" not in result.stderr
    result = run("events", "--config", config, "--verify", "--json")
    assert json.loads(result.stdout)["first_bad_seq"] == 3

    (data / "events.sqlite3.head").unlink()
    result = run("events", "--config", config, "--verify")
    assert result.returncode == 1 and result.stdout.startswith(
        "BROKEN: the log records a head checkpoint from event 1 on, but there is none: "
        "it was deleted; restore"
    )


def test_init_refuses_to_overwrite(tmp_path):
    data = tmp_path / "n"
    assert run("init", "--data-dir", str(data)).returncode == 0
    key = (data / "node.key").read_bytes()
    result = run("init", "--data-dir", str(data))
    assert result.returncode == 2
    assert "error [config_invalid]" in result.stderr and "refusing to overwrite" in result.stderr
    assert (data / "node.key").read_bytes() == key


def test_bad_input_gives_clear_error_and_changes_nothing(tmp_path):
    result = run("init", "--data-dir", str(tmp_path / "x"), "--port", "99999")
    assert result.returncode == 2 and "'listen.port'" in result.stderr
    assert not (tmp_path / "x").exists()

    data = tmp_path / "n"
    assert run("init", "--data-dir", str(data)).returncode == 0
    os.chmod(data / "node.key", 0o644)
    result = run("id", "--config", str(data / "node.toml"))
    assert result.returncode == 2 and "error [key_file_insecure]" in result.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nname = "a"\ndata_dir = "d"\nsurprise = 1\n')
    result = run("id", "--config", str(bad))
    assert result.returncode == 2 and "config key 'node.surprise': unknown key" in result.stderr
    assert "Traceback" not in result.stderr
