"""The signed head checkpoint: a deleted tail of the event log is named (issue 13 item 9)."""

import asyncio
import json
import sqlite3
import stat

import pytest

from hearthnet.config import config_from_dict
from hearthnet.constants import EVENTLOG_FILE_NAME, GENESIS_HASH
from hearthnet.errors import ErrorCode
from hearthnet.eventlog import EventLog
from hearthnet.eventlog.checkpoint import (
    Checkpoint,
    check_head,
    checkpoint_path,
    decode_checkpoint,
    encode_checkpoint,
    read_checkpoint,
)
from hearthnet.eventlog.event import encode_payload, now_ts, seal
from hearthnet.eventlog.store import HEAD_ADOPTED_EVENT
from hearthnet.identity import NodeIdentity
from hearthnet.node import Node
from tests.helpers import raises_code

# --- the pure parts ---------------------------------------------------------------------------


def test_a_checkpoint_round_trips_only_for_its_owner(identity):
    data = encode_checkpoint(identity, 7, "a" * 64)
    assert decode_checkpoint(data, identity.node_id) == Checkpoint(identity.node_id, 7, "a" * 64)
    with raises_code(ErrorCode.EVENTLOG_INVALID, "belongs to another node"):
        decode_checkpoint(data, NodeIdentity.generate().node_id)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: {**d, "seq": d["seq"] + 5}, "signature does not verify"),
        (lambda d: {**d, "hash": "b" * 64}, "signature does not verify"),
        (lambda d: {**d, "signature": "00" * 64}, "signature does not verify"),
        (lambda d: {**d, "signature": "zz"}, "signature does not verify"),
        (lambda d: {**d, "seq": -1}, "bad seq"),
        (lambda d: {**d, "v": 2}, "unknown format version"),
        (lambda d: {k: v for k, v in d.items() if k != "hash"}, "not a checkpoint record"),
    ],
)
def test_an_edited_checkpoint_says_why(identity, edit, reason):
    record = json.loads(encode_checkpoint(identity, 7, "a" * 64))
    edited = json.dumps(edit(record), sort_keys=True, separators=(",", ":")).encode()
    with raises_code(ErrorCode.EVENTLOG_INVALID, reason):
        decode_checkpoint(edited, identity.node_id)


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"{not json", b"[1,2]", b"x" * 10_000])
def test_an_unreadable_checkpoint_is_named_not_a_traceback(identity, data):
    with raises_code(ErrorCode.EVENTLOG_INVALID, "head checkpoint"):
        decode_checkpoint(data, identity.node_id)


def test_check_head_names_the_missing_range():
    cp = Checkpoint(NodeIdentity.generate().node_id, 9, "h9")
    assert check_head(cp, 9, "h9") is None
    assert check_head(cp, 12, "h9") is None  # the checkpoint may lag the log, never lead it
    assert check_head(cp, 6, None) == (
        "events 7..9 missing after the last one (seq 6): the log was truncated"
    )
    assert "events 1..9 missing" in (check_head(cp, 0, None) or "")
    assert "event 9 is not the one the head checkpoint signed" in (check_head(cp, 9, "x") or "")
    assert check_head(Checkpoint(cp.owner, 0, GENESIS_HASH), 0, None) is None


# --- a real node and its real SQLite log ------------------------------------------------------


def _config(tmp_path):
    return config_from_dict(
        {
            "node": {"name": "n", "data_dir": str(tmp_path / "n"), "network_id": "test-net"},
            "listen": {"host": "127.0.0.1", "port": 0},
            "llm": {"enabled": False, "device": "cpu"},
        },
        tmp_path,
    )


async def _run_node(config, identity, events: int) -> int:
    """Start the node, append `events` more events, stop it; its head seq after the stop."""
    node = Node(config, identity)
    await node.start()
    try:
        assert node.eventlog is not None
        for i in range(events):
            await node.eventlog.append("test.event", {"i": i})
    finally:
        await node.stop()
    return await _head(config, identity)


async def _head(config, identity) -> int:
    db = sqlite3.connect(config.data_dir / EVENTLOG_FILE_NAME)
    (seq,) = db.execute("SELECT max(seq) FROM events").fetchone()
    db.close()
    return int(seq)


async def _verify(config, identity):
    log = EventLog.open_readonly(config.data_dir / EVENTLOG_FILE_NAME, identity.node_id)
    try:
        return await log.verify()
    finally:
        await log.close()


def _sql(config, sql, params=()):
    db = sqlite3.connect(config.data_dir / EVENTLOG_FILE_NAME)
    db.execute(sql, params)
    db.commit()
    db.close()


async def test_deleted_tail_rows_fail_verify_naming_the_range(tmp_path, identity):
    config = _config(tmp_path)
    head = await _run_node(config, identity, 10)
    assert (await _verify(config, identity)).ok
    _sql(config, "DELETE FROM events WHERE seq > ?", (head - 4,))
    result = await _verify(config, identity)
    assert not result.ok and result.checked == head - 4 and result.first_bad_seq == head - 3
    assert result.reason == (
        f"events {head - 3}..{head} missing after the last one (seq {head - 4}): "
        "the log was truncated"
    )
    # A writer would overwrite the evidence: the node refuses to start, and says how to go on.
    with raises_code(ErrorCode.EVENTLOG_INVALID, f"events {head - 3}..{head} missing") as info:
        await Node(config, identity).start()
    assert "move" in info.value.message and ".head aside" in info.value.message
    assert await _head(config, identity) == head - 4  # nothing was appended


async def test_emptied_log_fails_verify(tmp_path, identity):
    config = _config(tmp_path)
    head = await _run_node(config, identity, 3)
    _sql(config, "DELETE FROM events")
    result = await _verify(config, identity)
    assert not result.ok and result.reason is not None
    assert result.reason.startswith(f"events 1..{head} missing after the last one (seq 0)")


async def test_a_rewritten_head_with_the_key_fails_verify(tmp_path, identity):
    """Whoever holds the key can re-sign a valid chain; it still is not the checkpointed one."""
    config = _config(tmp_path)
    head = await _run_node(config, identity, 3)
    db = sqlite3.connect(config.data_dir / EVENTLOG_FILE_NAME)
    (prev,) = db.execute("SELECT prev_hash FROM events WHERE seq = ?", (head,)).fetchone()
    forged = seal(identity, head, prev, "test.event", encode_payload({"i": 99}), now_ts())
    db.execute(
        "UPDATE events SET ts = ?, type = ?, payload = ?, hash = ?, signature = ? WHERE seq = ?",
        (forged.ts, forged.type, forged.payload_bytes, forged.hash, forged.signature, head),
    )
    db.commit()
    db.close()
    result = await _verify(config, identity)
    assert not result.ok and result.first_bad_seq == head
    assert f"event {head} is not the one the head checkpoint signed" in (result.reason or "")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: d.replace(b'"seq":', b'"seq":1'), "signature does not verify"),
        (lambda d: d[: len(d) // 2], "is unreadable"),
        (lambda d: b"\x00" * 16, "is unreadable"),
    ],
)
async def test_a_tampered_checkpoint_fails_verify(tmp_path, identity, damage, reason):
    config = _config(tmp_path)
    await _run_node(config, identity, 2)
    path = checkpoint_path(config.data_dir / EVENTLOG_FILE_NAME)
    path.write_bytes(damage(path.read_bytes()))
    result = await _verify(config, identity)
    assert not result.ok and result.first_bad_seq is None
    assert reason in (result.reason or "") and str(path) in (result.reason or "")
    with raises_code(ErrorCode.EVENTLOG_INVALID, reason):
        await Node(config, identity).start()


async def test_checkpoint_is_private_and_intact_after_restart(tmp_path, identity):
    config = _config(tmp_path)
    path = checkpoint_path(config.data_dir / EVENTLOG_FILE_NAME)
    first = await _run_node(config, identity, 5)
    assert read_checkpoint(path, identity.node_id) is not None
    assert read_checkpoint(path, identity.node_id).seq == first  # type: ignore[union-attr]
    second = await _run_node(config, identity, 5)
    assert second > first + 5  # node.started / node.stopped around the appends
    checkpoint = read_checkpoint(path, identity.node_id)
    assert checkpoint is not None and checkpoint.seq == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.with_name(path.name + ".tmp").exists()
    result = await _verify(config, identity)
    assert result.ok and result.checked == second


async def test_missing_checkpoint_fails_verify_until_the_writer_adopts_the_head(tmp_path, identity):
    """A log from before checkpoints (or with its checkpoint moved aside) fails verify; the
    node's next start adopts its head and says so in the log itself."""
    config = _config(tmp_path)
    head = await _run_node(config, identity, 2)
    path = checkpoint_path(config.data_dir / EVENTLOG_FILE_NAME)
    path.unlink()
    result = await _verify(config, identity)
    assert not result.ok and result.first_bad_seq is None
    assert (result.reason or "").startswith(f"no head checkpoint {path}")
    after = await _run_node(config, identity, 0)
    log = EventLog.open_readonly(config.data_dir / EVENTLOG_FILE_NAME, identity.node_id)
    try:
        adopted = await log.read(head, types=[HEAD_ADOPTED_EVENT])
    finally:
        await log.close()
    assert [(e.seq, e.payload["seq"]) for e in adopted] == [(head + 1, head)]
    result = await _verify(config, identity)
    assert result.ok and result.checked == after


async def test_verify_beside_a_busy_writer_never_sees_the_checkpoint_ahead(tmp_path, identity):
    """The checkpoint is written only after a commit, so a reader that verifies while the
    writer appends as fast as it can always passes."""
    path = tmp_path / EVENTLOG_FILE_NAME
    writer = EventLog(path, identity)
    reader = EventLog.open_readonly(path, identity.node_id)
    done = asyncio.Event()

    async def append() -> None:
        for i in range(600):
            await writer.append("busy.event", {"i": i})
        done.set()

    task = asyncio.create_task(append())
    results = []
    try:
        while not done.is_set():
            results.append(await reader.verify())
    finally:
        await task
        await reader.close()
        await writer.close()
    assert len(results) > 1 and all(r.ok for r in results), [r for r in results if not r.ok]
    checkpoint = read_checkpoint(checkpoint_path(path), identity.node_id)
    assert checkpoint is not None and checkpoint.seq == 600  # close writes the last head
