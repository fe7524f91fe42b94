"""The signed head checkpoint: a deleted tail of the event log is named (issue 13 item 9)."""

import asyncio
import json
import os
import sqlite3
import stat
import time

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
from hearthnet.eventlog.store import _SCHEMA, HEAD_ADOPTED_EVENT
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
    assert (
        "restore" in info.value.message and "aside to start a new, empty log" in info.value.message
    )
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
    assert list(path.parent.glob(path.name + ".*")) == []  # no temp file left behind
    result = await _verify(config, identity)
    assert result.ok and result.checked == second


def _legacy_log(config, identity, events: int) -> int:
    """A log as written before head checkpoints: event 1 links to the all-zero genesis and no
    `.head` file exists. Real sealed events in the real schema; returns its head seq."""
    path = config.data_dir / EVENTLOG_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA)
    prev = GENESIS_HASH
    for seq in range(1, events + 1):
        event = seal(identity, seq, prev, "old.event", encode_payload({"i": seq}), now_ts())
        db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                seq,
                event.ts,
                event.type,
                event.actor,
                event.payload_bytes,
                prev,
                event.hash,
                event.signature,
            ),
        )
        prev = event.hash
    db.commit()
    db.close()
    return events


async def _adoptions(config, identity) -> list[tuple[int, int]]:
    log = EventLog.open_readonly(config.data_dir / EVENTLOG_FILE_NAME, identity.node_id)
    try:
        return [(e.seq, e.payload["seq"]) for e in await log.read(types=[HEAD_ADOPTED_EVENT])]
    finally:
        await log.close()


async def test_a_log_from_before_checkpoints_is_adopted_once_and_then_guarded(tmp_path, identity):
    """A log from before checkpoints fails verify until its node's next start adopts its head,
    saying so in the log itself; from then on deleting the checkpoint no longer re-adopts."""
    config = _config(tmp_path)
    head = _legacy_log(config, identity, 4)
    path = checkpoint_path(config.data_dir / EVENTLOG_FILE_NAME)
    result = await _verify(config, identity)
    assert not result.ok and result.first_bad_seq is None
    assert (result.reason or "").startswith(f"no head checkpoint {path}")
    after = await _run_node(config, identity, 2)
    assert await _adoptions(config, identity) == [(head + 1, head)]
    result = await _verify(config, identity)
    assert result.ok and result.checked == after
    # The adoption event is the marker now: truncating after it and deleting the file is named.
    _sql(config, "DELETE FROM events WHERE seq > ?", (head + 2,))
    path.unlink()
    result = await _verify(config, identity)
    assert not result.ok and result.first_bad_seq is None
    assert (result.reason or "").startswith(
        f"the log records a head checkpoint from event {head + 1} on, but there is none"
    )
    with raises_code(ErrorCode.EVENTLOG_INVALID, "it was deleted"):
        await Node(config, identity).start()
    assert await _adoptions(config, identity) == [(head + 1, head)]


# --- the attacks of the security review (issue 13), against a real node and its real log ------


async def test_truncating_and_deleting_the_checkpoint_refuses_the_restart(tmp_path, identity):
    """F2: truncate the log, delete the `.head` file, restart. Before, the node adopted the
    short log's head and verify passed; now the log's own first event says it had a
    checkpoint, so verify fails and the node refuses to start, saying how to recover."""
    config = _config(tmp_path)
    head = await _run_node(config, identity, 10)
    _sql(config, "DELETE FROM events WHERE seq > ?", (head - 5,))
    path = checkpoint_path(config.data_dir / EVENTLOG_FILE_NAME)
    path.unlink()
    result = await _verify(config, identity)
    assert not result.ok and result.checked == head - 5
    assert result.reason == (
        "the log records a head checkpoint from event 1 on, but there is none: it was deleted; "
        f"restore {path} from a backup of this node's data_dir"
    )
    with raises_code(ErrorCode.EVENTLOG_INVALID, "it was deleted") as info:
        await Node(config, identity).start()
    assert f"restore {config.data_dir / EVENTLOG_FILE_NAME} and {path}" in info.value.message
    assert "aside to start a new, empty log" in info.value.message
    assert await _head(config, identity) == head - 5  # nothing was appended, nothing adopted
    assert await _adoptions(config, identity) == []
    assert not (await _verify(config, identity)).ok
    # The documented remaining edge: emptied log and deleted checkpoint look like a new node.
    _sql(config, "DELETE FROM events")
    assert await _run_node(config, identity, 0) == 2  # node.started, node.stopped
    assert (await _verify(config, identity)).ok


async def test_a_checkpoint_from_before_the_marker_is_refused(tmp_path, identity):
    """A head file older than the log's adoption event cannot be one this log's writer left."""
    config = _config(tmp_path)
    _legacy_log(config, identity, 3)
    path = checkpoint_path(config.data_dir / EVENTLOG_FILE_NAME)
    await _run_node(config, identity, 0)  # adopts at seq 4
    assert await _adoptions(config, identity) == [(4, 3)]
    db = sqlite3.connect(config.data_dir / EVENTLOG_FILE_NAME)
    (hash2,) = db.execute("SELECT hash FROM events WHERE seq = 2").fetchone()
    db.close()
    path.write_bytes(encode_checkpoint(identity, 2, hash2))
    result = await _verify(config, identity)
    assert not result.ok and "older than the log's record of checkpoints from event 4" in (
        result.reason or ""
    )
    with raises_code(ErrorCode.EVENTLOG_INVALID, "it was replaced"):
        await Node(config, identity).start()


async def test_a_symlink_at_the_old_temp_name_does_not_stop_checkpoints(tmp_path, identity):
    """F4: a symlink planted at the fixed `events.sqlite3.head.tmp` made every later write fail
    (ELOOP) and the checkpoint go stale. Writes now use a fresh random name beside it."""
    config = _config(tmp_path)
    first = await _run_node(config, identity, 1)
    path = checkpoint_path(config.data_dir / EVENTLOG_FILE_NAME)
    target = tmp_path / "precious"
    target.write_text("precious")
    planted = path.with_name(path.name + ".tmp")
    planted.symlink_to(target)
    after = await _run_node(config, identity, 5)
    checkpoint = read_checkpoint(path, identity.node_id)
    assert checkpoint is not None and checkpoint.seq == after > first
    assert target.read_text() == "precious" and planted.is_symlink()
    assert sorted(p.name for p in path.parent.glob(path.name + ".*")) == [planted.name]
    assert (await _verify(config, identity)).ok


async def test_a_failing_checkpoint_write_is_counted_and_logged(tmp_path, identity, capsys):
    """A checkpoint that cannot be written must not go stale silently: `node status` counts it
    and the log says so at error, once per interval however many fail."""
    config = _config(tmp_path)
    node = Node(config, identity)
    await node.start()
    try:
        log = node.eventlog
        assert log is not None and log.stats == {}
        # A directory where the checkpoint goes: every rename onto it fails (even for root).
        # A throttled write from the start may land between unlink and mkdir: try again.
        for _ in range(100):
            log.checkpoint_path.unlink(missing_ok=True)
            try:
                log.checkpoint_path.mkdir()
                break
            except FileExistsError:
                await asyncio.sleep(0.01)
        assert log.checkpoint_path.is_dir()
        try:
            for i in range(20):
                await log.append("test.event", {"i": i})
                await asyncio.sleep(0.03)  # past the write interval: each append is tried
        finally:
            log.checkpoint_path.rmdir()
        failed = log.stats["eventlog_checkpoint_failed"]
        assert failed >= 20  # each append was tried: the interval had passed before each
        status = await node._status(None, None)  # type: ignore[arg-type]
        assert status.counters["eventlog_checkpoint_failed"] >= failed
    finally:
        await node.stop()
    lines = [line for line in capsys.readouterr().out.splitlines() if "not written" in line]
    assert len(lines) == 1 and "[error" in lines[0] and "failures=1" in lines[0]
    assert (await _verify(config, identity)).ok  # the stop writes the last head once it can


@pytest.mark.parametrize("kind", ["fifo", "symlink to a fifo", "directory"])
async def test_a_fifo_at_the_checkpoint_path_fails_fast(tmp_path, identity, kind):
    """F5: a FIFO at the head path hung verify and start (open blocks for a writer). It is now
    opened without blocking or following links and refused unless it is a regular file."""
    config = _config(tmp_path)
    await _run_node(config, identity, 2)
    path = checkpoint_path(config.data_dir / EVENTLOG_FILE_NAME)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(tmp_path / "fifo")
        path.symlink_to(tmp_path / "fifo")
    why = "is a symbolic link" if kind.startswith("symlink") else "is not a regular file"
    started = time.monotonic()
    result = await asyncio.wait_for(_verify(config, identity), 1.0)
    assert not result.ok and why in (result.reason or "")
    with raises_code(ErrorCode.EVENTLOG_INVALID, why):
        await asyncio.wait_for(Node(config, identity).start(), 1.0)
    assert time.monotonic() - started < 1.0


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
