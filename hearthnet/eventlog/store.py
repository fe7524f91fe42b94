"""EventLog: the node's append-only, hash-chained, signed log in SQLite.

WAL with synchronous=FULL, so an append that returned survives a crash. Every database call runs
on one dedicated worker thread: the event loop never blocks on an fsync, and appends are
serialised without further locking. A lock file makes the log single-writer across processes;
read-only handles (the CLI reading a running node's log) take no lock. A signed head checkpoint
beside the database (hearthnet/eventlog/checkpoint.py) lets `verify` see a deleted tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hearthnet.constants import (
    EVENTLOG_BUSY_TIMEOUT_S,
    EVENTLOG_MAX_LOCAL_SUBSCRIBERS,
    EVENTLOG_READ_MAX_ROWS,
    EVENTLOG_SUBSCRIBER_QUEUE_MAX,
    FAIR_SHARE_RESERVED_PEERS,
    GENESIS_HASH,
    MAX_SUBSCRIPTIONS_PER_PEER,
    SUBSCRIPTIONS_GUARANTEED_PER_PEER,
    SUBSCRIPTIONS_SHARED,
)
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog.checkpoint import (
    CHECKPOINTED_GENESIS_HASH,
    Checkpoint,
    check_head,
    check_marker,
    checkpoint_path,
    encode_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from hearthnet.eventlog.event import (
    Event,
    check_event_type,
    check_link,
    encode_payload,
    now_ts,
    seal,
)
from hearthnet.fairshare import FairShare
from hearthnet.identity import NodeID, NodeIdentity
from hearthnet.logs import get_logger

T = TypeVar("T")
_log = get_logger("hearthnet.eventlog")
# Recorded when a writer opens a non-empty log from before head checkpoints: the log itself
# says from where on a deleted tail is detectable, and that a checkpoint must exist from then on.
HEAD_ADOPTED_EVENT = "eventlog.head.adopted"
# A checkpoint that cannot be written is logged at error at most once per interval (with the
# count since the last line) and counted in `stats`, so a node whose checkpoint goes stale says so.
CHECKPOINT_FAILURE_LOG_INTERVAL_S = 10.0
# At most one checkpoint write (an fsync + rename, ~0.25 ms) per interval while appends stream
# in; the first append after a pause is checkpointed at once. See docs/decisions.md.
CHECKPOINT_MIN_INTERVAL_S = 0.02

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY,
    ts         TEXT    NOT NULL,
    type       TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    prev_hash  TEXT    NOT NULL,
    hash       TEXT    NOT NULL UNIQUE,
    signature  BLOB    NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS events_type ON events(type, seq);
"""
_COLUMNS = "seq, ts, type, actor, payload, prev_hash, hash, signature"


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of `EventLog.verify`: how many events checked out and, if not ok, the first
    bad seq and why."""

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None


def _row_to_event(row: tuple[Any, ...]) -> Event:
    seq, ts, typ, actor, payload, prev_hash, hsh, sig = row
    return Event(seq, ts, typ, NodeID(actor), bytes(payload), prev_hash, hsh, bytes(sig))


class Subscription:
    """Live events whose type starts with a prefix, from the moment of subscribing.

    Bounded: a subscriber that falls more than EVENTLOG_SUBSCRIBER_QUEUE_MAX events behind gets
    `subscription_overflow` (with the last seq it saw) and can catch up with `read(after_seq)`.
    """

    def __init__(self, log: EventLog, type_prefix: str, peer: str | None = None):
        self.type_prefix = type_prefix
        self.peer = peer  # the remote subscriber it is held for; None for the node itself
        self._log = log
        self._closed = False
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(EVENTLOG_SUBSCRIBER_QUEUE_MAX)
        self._overflowed = False
        self.last_seq = 0

    def _offer(self, event: Event) -> None:
        if self._overflowed or not event.type.startswith(self.type_prefix):
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._overflowed = True

    def _end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    def close(self) -> None:
        """Stop receiving and give the subscription's fair-share unit back."""
        if not self._closed:
            self._closed = True
            self._log._release(self)
        self._end()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._overflowed and self._queue.empty():
            self.close()
            raise HearthnetError(
                ErrorCode.SUBSCRIPTION_OVERFLOW,
                "subscriber fell too far behind; catch up with read(after_seq)",
                {"last_seq": self.last_seq},
            )
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        self.last_seq = event.seq
        return event


class EventLog:
    """The node's own log: append signed events, read them back, follow them live, verify the chain.

    Only the owner appends (one writer per file); peers see events through subscriptions filtered
    by the node's event policy."""

    def __init__(self, path: Path, identity: NodeIdentity):
        """Open (creating if needed) `identity`'s log for writing; one writer per file."""
        self._identity: NodeIdentity | None = identity
        self.owner: NodeID = identity.node_id
        self._open(Path(path), readonly=False)

    @classmethod
    def open_readonly(cls, path: Path, owner: NodeID) -> EventLog:
        """A reader beside a running writer: no appends, no lock."""
        log = cls.__new__(cls)
        log._identity = None
        log.owner = owner
        log._open(Path(path), readonly=True)
        return log

    def _open(self, path: Path, readonly: bool) -> None:
        self.path = path
        self.checkpoint_path = checkpoint_path(path)
        self._subscribers: set[Subscription] = set()
        self._local_subscribers = 0
        self._remote_subscribers = FairShare(
            MAX_SUBSCRIPTIONS_PER_PEER,
            SUBSCRIPTIONS_GUARANTEED_PER_PEER,
            FAIR_SHARE_RESERVED_PEERS,
            SUBSCRIPTIONS_SHARED,
        )
        self._append_lock = asyncio.Lock()
        self._lock_fd: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eventlog")
        # Checkpoints are written on a thread of their own, coalesced (see `_store`).
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eventlog-head")
        self._head_lock = threading.Lock()
        self._head_pending: tuple[int, str] | None = None
        self._head_written_at = 0.0
        self._closing = threading.Event()  # cuts the interval short so close writes at once
        self.checkpoint_failures = 0
        self._failures_unlogged = 0
        self._failure_logged_at = -float("inf")
        if readonly and not path.exists():
            raise HearthnetError(ErrorCode.EVENTLOG_INVALID, f"no event log at {path}")
        if not readonly:
            self._take_lock()
        try:
            self._db = self._executor.submit(self._connect, readonly).result()
            self._head: tuple[int, str] = self._executor.submit(self._read_head).result()
            if not readonly:
                self._executor.submit(self._open_checkpoint).result()
        except BaseException:
            self._release_lock()
            self._executor.shutdown()
            self._checkpointer.shutdown()
            raise

    def _take_lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HearthnetError(
                ErrorCode.EVENTLOG_LOCKED,
                f"event log {self.path} is open in another process (a node already running with "
                "this data_dir?)",
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        try:
            if readonly:
                db = sqlite3.connect(
                    f"file:{self.path}?mode=ro",
                    uri=True,
                    timeout=EVENTLOG_BUSY_TIMEOUT_S,
                    check_same_thread=False,
                )
            else:
                db = sqlite3.connect(
                    self.path, timeout=EVENTLOG_BUSY_TIMEOUT_S, check_same_thread=False
                )
                os.chmod(self.path, 0o600)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM events").fetchone()
        except sqlite3.DatabaseError as exc:
            raise HearthnetError(
                ErrorCode.EVENTLOG_INVALID, f"{self.path} is not a readable event log: {exc}"
            ) from None
        return db

    def _read_head(self) -> tuple[int, str]:
        """The last event's seq and hash; for an empty log, the genesis its first event links
        to, which marks the log as checkpointed from its start (checkpoint.py)."""
        row = self._db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return (0, CHECKPOINTED_GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))

    def _marker_seq(self) -> int | None:
        """From which event on the log's own signed events say it has a checkpoint: 1 for a log
        created with checkpoints, the first adoption event for an older one, None for neither."""
        row = self._db.execute("SELECT prev_hash FROM events WHERE seq = 1").fetchone()
        if row is not None and row[0] == CHECKPOINTED_GENESIS_HASH:
            return 1
        row = self._db.execute(
            "SELECT min(seq) FROM events WHERE type = ?", (HEAD_ADOPTED_EVENT,)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _hash_at(self, seq: int) -> str | None:
        row = self._db.execute("SELECT hash FROM events WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else str(row[0])

    def _open_checkpoint(self) -> None:
        """Refuse to write on a log that ends before its checkpoint, or that records having one
        it lacks (appending would overwrite the evidence); give a log from before checkpoints
        one, recording that in the log."""
        assert self._identity is not None
        fix = (
            f"restore {self.path} and {self.checkpoint_path} from a backup of this node's "
            f"data_dir, or move {self.path}* aside to start a new, empty log"
        )
        try:
            checkpoint = read_checkpoint(self.checkpoint_path, self.owner)
        except HearthnetError as exc:
            raise HearthnetError(ErrorCode.EVENTLOG_INVALID, f"{exc.message}; {fix}") from None
        seq, prev = self._head
        marker = self._marker_seq()
        reason = check_marker(marker, checkpoint)
        if checkpoint is not None and reason is None:
            reason = check_head(checkpoint, seq, self._hash_at(checkpoint.seq))
        if reason is not None:
            raise HearthnetError(ErrorCode.EVENTLOG_INVALID, f"{self.path}: {reason}; {fix}")
        try:
            if checkpoint is None or checkpoint.seq != seq:
                self._checkpoint(self._head)
            if marker is None and seq > 0:
                self._adopt(seq, prev)
        except OSError as exc:
            raise HearthnetError(
                ErrorCode.EVENTLOG_INVALID,
                f"cannot write the head checkpoint {self.checkpoint_path}: {exc.strerror} "
                "(is the data directory writable by this user?)",
            ) from None

    def _adopt(self, seq: int, prev: str) -> None:
        """Mark a log from before checkpoints as checkpointed from here on, in the log itself.

        Its head is already checkpointed (by the caller), so the file is never missing or
        behind the marker, even after a crash between the two."""
        assert self._identity is not None
        _log.warning("event log predates head checkpoints; adopting its head", seq=seq)
        adopted = seal(
            self._identity,
            seq + 1,
            prev,
            HEAD_ADOPTED_EVENT,
            encode_payload({"seq": seq, "hash": prev}),
            now_ts(),
        )
        self._insert(adopted)
        self._head = (adopted.seq, adopted.hash)
        self._checkpoint(self._head)

    def _checkpoint(self, head: tuple[int, str]) -> None:
        """Sign a committed head into the checkpoint file; only ever given one after its
        commit, so the file is never ahead of the durable log."""
        assert self._identity is not None
        write_checkpoint(self.checkpoint_path, encode_checkpoint(self._identity, *head))

    def _store(self, event: Event) -> None:
        """Commit `event`, then hand its head to the checkpoint thread.

        The checkpoint's fsync + rename costs about as much as the commit itself, so it is not
        on the append's path: the thread writes the newest committed head, at most once per
        CHECKPOINT_MIN_INTERVAL_S (a stream of appends costs one write per interval, not one
        each). The file lags the log by at most that, and `close` writes the last head."""
        self._insert(event)
        self._head = (event.seq, event.hash)
        with self._head_lock:
            idle = self._head_pending is None
            self._head_pending = self._head
        if idle:
            self._checkpointer.submit(self._flush_checkpoints)

    def _flush_checkpoints(self) -> None:
        """Write pending heads until none is left. One that cannot be written leaves the
        previous checkpoint (behind the log, never ahead): the append still stands, verify
        still passes, and the next append tries again; the failure is counted (`stats`) and
        logged at error, once per CHECKPOINT_FAILURE_LOG_INTERVAL_S."""
        while True:
            wait = self._head_written_at + CHECKPOINT_MIN_INTERVAL_S - time.monotonic()
            if wait > 0:
                self._closing.wait(wait)
            with self._head_lock:  # the newest head committed by now
                head = self._head_pending
            if head is None:
                return
            try:
                self._checkpoint(head)
            except OSError as exc:
                self._checkpoint_failed(exc)
            self._head_written_at = time.monotonic()
            with self._head_lock:
                if self._head_pending == head:
                    self._head_pending = None

    def _checkpoint_failed(self, exc: OSError) -> None:
        self.checkpoint_failures += 1
        self._failures_unlogged += 1
        now = time.monotonic()
        if now - self._failure_logged_at >= CHECKPOINT_FAILURE_LOG_INTERVAL_S:
            _log.error(
                "head checkpoint not written: a deleted tail of the log may go undetected",
                path=str(self.checkpoint_path),
                error=str(exc),
                failures=self._failures_unlogged,
                interval_s=CHECKPOINT_FAILURE_LOG_INTERVAL_S,
            )
            self._failure_logged_at = now
            self._failures_unlogged = 0

    @property
    def stats(self) -> dict[str, int]:
        """Counters for `node status`: checkpoint writes that failed (only once there is one)."""
        return (
            {"eventlog_checkpoint_failed": self.checkpoint_failures}
            if self.checkpoint_failures
            else {}
        )

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def head_seq(self) -> int:
        """The seq of the last committed event (0 for an empty log)."""
        return self._head[0]

    async def append(self, event_type: str, payload: dict[str, Any]) -> Event:
        """Sign and durably store an event; returns only after it is committed to disk."""
        if self._identity is None:
            raise HearthnetError(ErrorCode.EVENTLOG_INVALID, "this event log is read-only")
        check_event_type(event_type)
        payload_bytes = encode_payload(payload)
        async with self._append_lock:
            seq, prev = self._head
            event = seal(self._identity, seq + 1, prev, event_type, payload_bytes, now_ts())
            await self._run(self._store, event)
            for sub in list(self._subscribers):
                sub._offer(event)
        return event

    def _insert(self, event: Event) -> None:
        with self._db:
            self._db.execute(
                f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    event.seq,
                    event.ts,
                    event.type,
                    event.actor,
                    event.payload_bytes,
                    event.prev_hash,
                    event.hash,
                    event.signature,
                ),
            )

    async def read(
        self,
        after_seq: int = 0,
        types: Iterable[str] | None = None,
        type_prefix: str | None = None,
        limit: int = EVENTLOG_READ_MAX_ROWS,
    ) -> list[Event]:
        """Events after `after_seq`, optionally of exact `types` or a `type_prefix`."""
        limit = max(0, min(limit, EVENTLOG_READ_MAX_ROWS))
        sql = f"SELECT {_COLUMNS} FROM events WHERE seq > ?"  # noqa: S608
        params: list[Any] = [after_seq]
        if types is not None:
            wanted = list(types)
            sql += f" AND type IN ({','.join('?' * len(wanted))})" if wanted else " AND 0"
            params += wanted
        if type_prefix:
            sql += " AND substr(type, 1, ?) = ?"
            params += [len(type_prefix), type_prefix]
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)

        def query() -> list[Event]:
            return [_row_to_event(r) for r in self._db.execute(sql, params).fetchall()]

        return await self._run(query)

    async def read_all(self, type_prefix: str | None = None) -> list[Event]:
        """Every matching event, paging through the log (used to rebuild state on start)."""
        out: list[Event] = []
        after = 0
        while page := await self.read(after, type_prefix=type_prefix):
            out.extend(page)
            after = page[-1].seq
        return out

    def subscribe(self, type_prefix: str = "", peer: str | None = None) -> Subscription:
        """Live events from now on. `peer` names the remote subscriber it is for: peers draw
        on fair shares (constants MAX_SUBSCRIPTIONS_PER_PEER and below), so none can use up
        the others'; a refusal is `subscription_overflow`, never silence."""
        if peer is None:
            if self._local_subscribers >= EVENTLOG_MAX_LOCAL_SUBSCRIBERS:
                raise HearthnetError(
                    ErrorCode.SUBSCRIPTION_OVERFLOW,
                    f"this node already has {EVENTLOG_MAX_LOCAL_SUBSCRIBERS} local event "
                    "readers; stop some (e.g. `hearthnet events --follow`) and retry",
                )
            self._local_subscribers += 1
        elif (why := self._remote_subscribers.try_acquire(peer)) is not None:
            raise HearthnetError(
                ErrorCode.SUBSCRIPTION_OVERFLOW,
                f"subscription refused: {why}; close subscriptions to this node or retry later",
                {"held": self._remote_subscribers.held(peer)},
            )
        sub = Subscription(self, type_prefix, peer)
        self._subscribers.add(sub)
        return sub

    def _release(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        if sub.peer is None:
            self._local_subscribers -= 1
        else:
            self._remote_subscribers.release(sub.peer)

    async def verify(self) -> VerifyResult:
        """Walk the whole chain; name the first event that is missing, altered or forged; then
        hold its end to the signed head checkpoint, so a deleted tail is named too. A log with
        no checkpoint fails: without one a deleted tail cannot be told from a short log; one
        whose events record that it had one says the checkpoint was deleted."""

        def walk() -> VerifyResult:
            # Read before the chain: the writer checkpoints only committed events, so this is
            # never ahead of the snapshot the SELECT below sees, even with the node running.
            checkpoint: Checkpoint | None = None
            unreadable: str | None = None
            try:
                checkpoint = read_checkpoint(self.checkpoint_path, self.owner)
            except HearthnetError as exc:
                unreadable = f"{exc.message} ({self.checkpoint_path})"
            hash_at_checkpoint: str | None = None
            marker: int | None = None
            expected_seq, prev, checked = 1, GENESIS_HASH, 0
            cursor = self._db.execute(f"SELECT {_COLUMNS} FROM events ORDER BY seq")  # noqa: S608
            while True:
                try:
                    rows = cursor.fetchmany(1000)
                except sqlite3.OperationalError:  # a text column that is not UTF-8 any more
                    bad = undecodable_from(expected_seq)
                    return VerifyResult(False, checked, bad, "row holds bytes that are not text")
                if not rows:
                    break
                for row in rows:
                    try:
                        event = _row_to_event(row)
                    except (TypeError, ValueError):
                        return VerifyResult(False, checked, int(row[0]), "malformed row")
                    if expected_seq == 1 and event.prev_hash == CHECKPOINTED_GENESIS_HASH:
                        prev, marker = CHECKPOINTED_GENESIS_HASH, 1
                    reason = check_link(event, expected_seq, prev, self.owner)
                    if reason is not None:
                        bad = min(expected_seq, event.seq)
                        return VerifyResult(False, checked, bad, reason)
                    if marker is None and event.type == HEAD_ADOPTED_EVENT:
                        marker = event.seq
                    expected_seq, prev, checked = event.seq + 1, event.hash, checked + 1
                    if checkpoint is not None and event.seq == checkpoint.seq:
                        hash_at_checkpoint = event.hash
            if unreadable is not None:
                return VerifyResult(False, checked, None, unreadable)
            reason = check_marker(marker, checkpoint)
            if reason is not None:
                restore = f"restore {self.checkpoint_path} from a backup of this node's data_dir"
                return VerifyResult(False, checked, None, f"{reason}; {restore}")
            if checkpoint is None:
                no_checkpoint = (
                    f"no head checkpoint {self.checkpoint_path}: a deleted tail cannot be "
                    "detected (a log from before checkpoints gets one when its node next starts)"
                )
                return VerifyResult(False, checked, None, no_checkpoint)
            reason = check_head(checkpoint, expected_seq - 1, hash_at_checkpoint)
            if reason is not None:
                bad = min(expected_seq, checkpoint.seq)
                return VerifyResult(False, checked, bad, reason)
            return VerifyResult(True, checked)

        def undecodable_from(start: int) -> int:
            """The first row from `start` that sqlite cannot hand back as text."""
            seqs = self._db.execute("SELECT seq FROM events WHERE seq >= ? ORDER BY seq", (start,))
            for (seq,) in seqs.fetchall():
                try:
                    self._db.execute(
                        f"SELECT {_COLUMNS} FROM events WHERE seq = ?",  # noqa: S608
                        (seq,),
                    ).fetchone()
                except sqlite3.OperationalError:
                    return int(seq)
            return start

        return await self._run(walk)

    async def close(self) -> None:
        """End subscriptions, close the database and write the last head checkpoint, then unlock."""
        for sub in list(self._subscribers):
            sub.close()
        with contextlib.suppress(RuntimeError):
            await self._run(self._db.close)
        self._executor.shutdown(wait=True)
        self._closing.set()
        self._checkpointer.shutdown(wait=True)  # the last head is on disk before the lock goes
        self._release_lock()
