import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from hearthnet.constants import EVENTLOG_SUBSCRIBER_QUEUE_MAX, GENESIS_HASH
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import EventLog
from hearthnet.eventlog.checkpoint import CHECKPOINTED_GENESIS_HASH
from hearthnet.identity import NodeIdentity
from tests.helpers import raises_code


@pytest.fixture
async def log(tmp_path, identity):
    log = EventLog(tmp_path / "events.sqlite3", identity)
    yield log
    await log.close()


async def test_append_returns_stored_event(log, identity):
    e1 = await log.append("fedlearn.round.announced", {"round": "r1", "n": 3})
    e2 = await log.append("fedlearn.round.joined", {"round": "r1"})
    assert (e1.seq, e2.seq) == (1, 2)
    # A new log's chain starts from the genesis that marks it as checkpointed (checkpoint.py).
    assert e1.prev_hash == CHECKPOINTED_GENESIS_HASH != GENESIS_HASH and e2.prev_hash == e1.hash
    assert e1.actor == identity.node_id
    assert e1.payload == {"round": "r1", "n": 3}
    assert e1.ts.endswith("Z")
    stored = await log.read()
    assert stored == [e1, e2]


async def test_read_filters(log):
    for i in range(6):
        await log.append(["a.x", "a.y", "b.z"][i % 3], {"i": i})
    assert [e.seq for e in await log.read(after_seq=3)] == [4, 5, 6]
    assert [e.seq for e in await log.read(types=["a.y", "b.z"])] == [2, 3, 5, 6]
    assert [e.seq for e in await log.read(type_prefix="a.")] == [1, 2, 4, 5]
    assert await log.read(types=[]) == []
    assert [e.seq for e in await log.read(limit=2)] == [1, 2]
    assert len(await log.read_all(type_prefix="b")) == 2


@pytest.mark.parametrize(
    ("etype", "payload", "code"),
    [
        ("Bad Type", {}, ErrorCode.EVENTLOG_INVALID),
        ("a..b", {}, ErrorCode.EVENTLOG_INVALID),
        ("", {}, ErrorCode.EVENTLOG_INVALID),
        ("ok", [], ErrorCode.EVENTLOG_INVALID),
        ("ok", {"x": float("nan")}, ErrorCode.CANONICAL_INVALID),
        ("ok", {"x": "y" * 300_000}, ErrorCode.PAYLOAD_TOO_LARGE),
    ],
)
async def test_bad_appends_change_nothing(log, etype, payload, code):
    await log.append("ok", {})
    with raises_code(code):
        await log.append(etype, payload)
    assert log.head_seq == 1
    assert (await log.verify()).ok


async def test_concurrent_appends_are_serialised(log):
    events = await asyncio.gather(*(log.append("c.t", {"i": i}) for i in range(50)))
    assert sorted(e.seq for e in events) == list(range(1, 51))
    result = await log.verify()
    assert result.ok and result.checked == 50


async def test_subscribe_by_prefix_sees_only_new_matching_events(log):
    await log.append("fedlearn.old", {})
    sub = log.subscribe("fedlearn.")
    await log.append("other.x", {})
    await log.append("fedlearn.new", {"k": 1})
    event = await asyncio.wait_for(sub.__anext__(), 1)
    assert event.type == "fedlearn.new" and event.payload == {"k": 1}
    sub.close()
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()


async def test_slow_subscriber_gets_overflow_not_unbounded_memory(log):
    sub = log.subscribe("")
    for i in range(EVENTLOG_SUBSCRIBER_QUEUE_MAX + 5):
        await log.append("t", {"i": i})
    seen = 0

    async def drain() -> None:
        nonlocal seen
        async for _ in sub:
            seen += 1

    with pytest.raises(HearthnetError) as exc:
        await drain()
    assert exc.value.code is ErrorCode.SUBSCRIPTION_OVERFLOW
    assert seen == EVENTLOG_SUBSCRIBER_QUEUE_MAX
    assert exc.value.detail == {"last_seq": EVENTLOG_SUBSCRIBER_QUEUE_MAX}


async def test_close_ends_subscriptions(tmp_path, identity):
    log = EventLog(tmp_path / "e.db", identity)
    sub = log.subscribe("")
    await log.close()
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()


async def test_reopen_continues_the_chain(tmp_path, identity):
    log = EventLog(tmp_path / "e.db", identity)
    first = await log.append("a", {})
    await log.close()
    log = EventLog(tmp_path / "e.db", identity)
    second = await log.append("b", {})
    assert second.seq == 2 and second.prev_hash == first.hash
    assert (await log.verify()).ok
    await log.close()


async def test_one_writer_per_file(tmp_path, identity):
    log = EventLog(tmp_path / "e.db", identity)
    with pytest.raises(HearthnetError) as exc:
        EventLog(tmp_path / "e.db", identity)
    assert exc.value.code is ErrorCode.EVENTLOG_LOCKED
    reader = EventLog.open_readonly(tmp_path / "e.db", identity.node_id)
    await log.append("a", {})
    assert len(await reader.read()) == 1
    with raises_code(ErrorCode.EVENTLOG_INVALID):
        await reader.append("a", {})
    await reader.close()
    await log.close()


async def test_not_a_database_is_reported(tmp_path, identity):
    path = tmp_path / "e.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(HearthnetError) as exc:
        EventLog(path, identity)
    assert exc.value.code is ErrorCode.EVENTLOG_INVALID
    assert path.read_bytes() == b"this is not sqlite" * 100
    EventLog(path.with_name("fresh.db"), identity)  # the lock was released: reopen works


def _tamper(path, sql, params=()):
    db = sqlite3.connect(path)
    db.execute(sql, params)
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("sql", "params", "bad_seq", "reason"),
    [
        ("UPDATE events SET payload = ? WHERE seq = 4", (b'{"i":99}',), 4, "hash"),
        ("UPDATE events SET type = 'x' WHERE seq = 6", (), 6, "hash"),
        ("UPDATE events SET ts = '2000-01-01T00:00:00.000000Z' WHERE seq = 2", (), 2, "hash"),
        ("DELETE FROM events WHERE seq = 5", (), 5, "expected seq 5"),
        ("UPDATE events SET signature = zeroblob(64) WHERE seq = 3", (), 3, "signature"),
        ("UPDATE events SET prev_hash = ? WHERE seq = 7", ("f" * 64,), 7, "prev_hash"),
        # a byte flip that leaves `ts` invalid UTF-8 is named, not a traceback
        ("UPDATE events SET ts = CAST(X'C328FF' AS TEXT) WHERE seq = 6", (), 6, "not text"),
    ],
)
async def test_tampering_is_named_by_verify(tmp_path, identity, sql, params, bad_seq, reason):
    path = tmp_path / "e.db"
    log = EventLog(path, identity)
    for i in range(8):
        await log.append("t", {"i": i})
    await log.close()
    _tamper(path, sql, params)
    log = EventLog.open_readonly(path, identity.node_id)
    result = await log.verify()
    await log.close()
    assert not result.ok
    assert result.first_bad_seq == bad_seq
    assert reason in (result.reason or "")


async def test_forged_rewrite_with_another_key_is_detected(tmp_path, identity):
    path = tmp_path / "e.db"
    log = EventLog(path, identity)
    await log.append("t", {"i": 1})
    await log.close()
    path.unlink()
    for suffix in ("-wal", "-shm", ".head"):  # the forger replaces the checkpoint too
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    forger = EventLog(path, NodeIdentity.generate())
    await forger.append("t", {"i": 1})
    await forger.close()
    reader = EventLog.open_readonly(path, identity.node_id)
    result = await reader.verify()
    await reader.close()
    assert not result.ok and result.first_bad_seq == 1 and "owner" in (result.reason or "")


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from hearthnet.eventlog import EventLog
    from hearthnet.identity import NodeIdentity

    async def main():
        log = EventLog(Path(sys.argv[1]), NodeIdentity.load(Path(sys.argv[2])))
        i = 0
        while True:
            event = await log.append("crash.test", {"i": i})
            sys.stdout.write(f"{event.seq}\\n")
            sys.stdout.flush()
            i += 1

    asyncio.run(main())
    """
)


async def test_acknowledged_appends_survive_sigkill(tmp_path, identity):
    key = tmp_path / "node.key"
    identity.save(key)
    path = tmp_path / "events.sqlite3"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(key)],
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged = []
    assert child.stdout is not None
    while len(acknowledged) < 200:
        line = child.stdout.readline()
        assert line, "child died early"
        acknowledged.append(int(line))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    for line in child.stdout:  # anything it managed to acknowledge before dying counts too
        if line.strip():
            acknowledged.append(int(line))
    log = EventLog(path, identity)  # the writer lock died with the child
    stored = {e.seq for e in await log.read_all()}
    assert set(acknowledged) <= stored
    result = await log.verify()
    assert result.ok and result.checked == len(stored)
    nxt = await log.append("after.crash", {})
    assert nxt.seq == max(stored) + 1
    await log.close()


async def test_subscribers_get_fair_shares_and_a_refusal_says_why(log):
    from hearthnet import constants as C

    per, floor = C.MAX_SUBSCRIPTIONS_PER_PEER, C.SUBSCRIPTIONS_GUARANTEED_PER_PEER
    greedy = -(-C.SUBSCRIPTIONS_SHARED // (per - floor))  # enough peers to fill the shared pool
    subs = []
    for i in range(greedy):  # each takes all it can get, then is refused
        while log._remote_subscribers.try_acquire(f"greedy{i}") is None:
            log._remote_subscribers.release(f"greedy{i}")
            subs.append(log.subscribe("", peer=f"greedy{i}"))
        with raises_code(ErrorCode.SUBSCRIPTION_OVERFLOW):
            log.subscribe("", peer=f"greedy{i}")
    assert len(subs) == floor * greedy + C.SUBSCRIPTIONS_SHARED
    # Everyone else still gets its guaranteed share, then `subscription_overflow`.
    for _ in range(floor):
        subs.append(log.subscribe("", peer="newcomer"))
    with raises_code(ErrorCode.SUBSCRIPTION_OVERFLOW):
        log.subscribe("", peer="newcomer")
    # The node's own readers have their own pool; closing frees a slot for the next peer.
    local = log.subscribe("")
    subs[-1].close()
    subs[-1].close()  # closing twice releases once
    subs.append(log.subscribe("", peer="newcomer"))
    with raises_code(ErrorCode.SUBSCRIPTION_OVERFLOW):
        log.subscribe("", peer="newcomer")
    assert len(subs) <= C.EVENTLOG_MAX_SUBSCRIBERS - C.EVENTLOG_MAX_LOCAL_SUBSCRIBERS
    await log.append("t", {})
    assert (await anext(aiter(local))).type == "t"
    for sub in subs:
        sub.close()
    assert log.subscribe("", peer="newcomer") is not None
