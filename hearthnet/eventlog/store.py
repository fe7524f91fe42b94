"""EventLog: the node's append-only, hash-chained, signed log in SQLite.

WAL with synchronous=FULL, so an append that returned survives a crash. Every database call runs
on one dedicated worker thread: the event loop never blocks on an fsync, and appends are
serialised without further locking. A lock file makes the log single-writer across processes;
read-only handles (the CLI reading a running node's log) take no lock. A signed head checkpoint
beside the database (hearthnet/eventlog/checkpoint.py) lets `verify` see a deleted tail.

The jobs live apart: rows.py is the SQLite schema and row codec, verify.py the chain walk and
the checkpoint checks, heads.py the checkpoint thread, subscriptions.py the live fan-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from hearthnet.constants import EVENTLOG_READ_MAX_ROWS
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import rows
from hearthnet.eventlog.checkpoint import checkpoint_path
from hearthnet.eventlog.event import Event, check_event_type, encode_payload, now_ts, seal
from hearthnet.eventlog.heads import (
    CHECKPOINT_FAILURE_LOG_INTERVAL_S,
    CHECKPOINT_MIN_INTERVAL_S,
    HeadWriter,
)
from hearthnet.eventlog.rows import SCHEMA as _SCHEMA
from hearthnet.eventlog.subscriptions import Subscribers, Subscription
from hearthnet.eventlog.verify import (
    HEAD_ADOPTED_EVENT,
    VerifyResult,
    adoption_event,
    check_on_open,
    walk,
)
from hearthnet.identity import NodeID, NodeIdentity
from hearthnet.logs import get_logger

__all__ = [
    "CHECKPOINT_FAILURE_LOG_INTERVAL_S",
    "CHECKPOINT_MIN_INTERVAL_S",
    "HEAD_ADOPTED_EVENT",
    "_SCHEMA",
    "EventLog",
    "Subscription",
    "VerifyResult",
]

T = TypeVar("T")
_log = get_logger("hearthnet.eventlog")


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
        self._subscribers = Subscribers()
        self._remote_subscribers = self._subscribers.remote
        self._append_lock = asyncio.Lock()
        self._lock_fd: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eventlog")
        # Checkpoints are written on a thread of their own, coalesced (see `_store`).
        self._heads = HeadWriter(self.checkpoint_path, self._identity)
        if readonly and not path.exists():
            raise HearthnetError(ErrorCode.EVENTLOG_INVALID, f"no event log at {path}")
        if not readonly:
            self._take_lock()
        try:
            self._db = self._executor.submit(rows.connect, path, readonly).result()
            self._head: tuple[int, str] = self._executor.submit(rows.read_head, self._db).result()
            if not readonly:
                self._executor.submit(self._open_checkpoint).result()
        except BaseException:
            self._release_lock()
            self._executor.shutdown()
            self._heads.close()
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

    def _open_checkpoint(self) -> None:
        """Refuse to write on a log that ends before its checkpoint, or that records having one
        it lacks (verify.check_on_open); give a log from before checkpoints one, recording that
        in the log."""
        assert self._identity is not None
        seq, prev = self._head
        checkpoint, marker = check_on_open(
            self._db, self.path, self.checkpoint_path, self.owner, seq
        )
        try:
            if checkpoint is None or checkpoint.seq != seq:
                self._heads.write(self._head)
            if marker is None and seq > 0:
                # The head is checkpointed above, so the file is never missing or behind the
                # marker, even after a crash between the two.
                _log.warning("event log predates head checkpoints; adopting its head", seq=seq)
                adopted = adoption_event(self._identity, seq, prev)
                rows.insert(self._db, adopted)
                self._head = (adopted.seq, adopted.hash)
                self._heads.write(self._head)
        except OSError as exc:
            raise HearthnetError(
                ErrorCode.EVENTLOG_INVALID,
                f"cannot write the head checkpoint {self.checkpoint_path}: {exc.strerror} "
                "(is the data directory writable by this user?)",
            ) from None

    def _store(self, event: Event) -> None:
        """Commit `event`, then hand its head to the checkpoint thread (heads.py): the file
        lags the log by at most CHECKPOINT_MIN_INTERVAL_S, and `close` writes the last head."""
        rows.insert(self._db, event)
        self._head = (event.seq, event.hash)
        self._heads.submit(self._head)

    @property
    def checkpoint_failures(self) -> int:
        """Checkpoint writes that failed since the log was opened."""
        return self._heads.failures

    @property
    def stats(self) -> dict[str, int]:
        """Counters for `node status`: checkpoint writes that failed (only once there is one)."""
        failures = self._heads.failures
        return {"eventlog_checkpoint_failed": failures} if failures else {}

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
            self._subscribers.offer(event)
        return event

    async def read(
        self,
        after_seq: int = 0,
        types: Iterable[str] | None = None,
        type_prefix: str | None = None,
        limit: int = EVENTLOG_READ_MAX_ROWS,
    ) -> list[Event]:
        """Events after `after_seq`, optionally of exact `types` or a `type_prefix`."""
        limit = max(0, min(limit, EVENTLOG_READ_MAX_ROWS))
        wanted = None if types is None else list(types)
        return await self._run(rows.select, self._db, after_seq, wanted, type_prefix, limit)

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
        return self._subscribers.subscribe(type_prefix, peer)

    async def verify(self) -> VerifyResult:
        """Walk the whole chain and hold its end to the signed head checkpoint (verify.walk):
        names the first event missing, altered or forged, or a deleted tail."""
        return await self._run(walk, self._db, self.checkpoint_path, self.owner)

    async def close(self) -> None:
        """End subscriptions, close the database and write the last head checkpoint, then unlock."""
        self._subscribers.close_all()
        with contextlib.suppress(RuntimeError):
            await self._run(self._db.close)
        self._executor.shutdown(wait=True)
        self._heads.close()  # the last head is on disk before the lock goes
        self._release_lock()
