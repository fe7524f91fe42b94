"""Writing the log's signed head checkpoint off the append path, coalesced.

The checkpoint's fsync + rename costs about as much as the commit itself, so a thread of its
own writes the newest committed head, at most once per CHECKPOINT_MIN_INTERVAL_S (a stream of
appends costs one write per interval, not one each). See docs/decisions.md."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hearthnet.eventlog.checkpoint import encode_checkpoint, write_checkpoint
from hearthnet.identity import NodeIdentity
from hearthnet.logs import get_logger

_log = get_logger("hearthnet.eventlog")
# A checkpoint that cannot be written is logged at error at most once per interval (with the
# count since the last line) and counted in `stats`, so a node whose checkpoint goes stale says so.
CHECKPOINT_FAILURE_LOG_INTERVAL_S = 10.0
# At most one checkpoint write (an fsync + rename, ~0.25 ms) per interval while appends stream
# in; the first append after a pause is checkpointed at once. See docs/decisions.md.
CHECKPOINT_MIN_INTERVAL_S = 0.02


class HeadWriter:
    """Signs committed heads into the checkpoint file; only ever given one after its commit,
    so the file is never ahead of the durable log."""

    def __init__(self, path: Path, identity: NodeIdentity | None):
        self.path = path
        self._identity = identity
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eventlog-head")
        self._lock = threading.Lock()
        self._pending: tuple[int, str] | None = None
        self._written_at = 0.0
        self._closing = threading.Event()  # cuts the interval short so close writes at once
        self.failures = 0
        self._failures_unlogged = 0
        self._failure_logged_at = -float("inf")

    def write(self, head: tuple[int, str]) -> None:
        """Write `head` now, on the calling thread (OSError if it cannot be)."""
        assert self._identity is not None
        write_checkpoint(self.path, encode_checkpoint(self._identity, *head))

    def submit(self, head: tuple[int, str]) -> None:
        """Hand a committed head to the thread; it lags the log by at most the interval."""
        with self._lock:
            idle = self._pending is None
            self._pending = head
        if idle:
            self._thread.submit(self._flush)

    def _flush(self) -> None:
        """Write pending heads until none is left. One that cannot be written leaves the
        previous checkpoint (behind the log, never ahead): the append still stands, verify
        still passes, and the next append tries again; the failure is counted (`stats`) and
        logged at error, once per CHECKPOINT_FAILURE_LOG_INTERVAL_S."""
        while True:
            wait = self._written_at + CHECKPOINT_MIN_INTERVAL_S - time.monotonic()
            if wait > 0:
                self._closing.wait(wait)
            with self._lock:  # the newest head committed by now
                head = self._pending
            if head is None:
                return
            try:
                self.write(head)
            except OSError as exc:
                self._failed(exc)
            self._written_at = time.monotonic()
            with self._lock:
                if self._pending == head:
                    self._pending = None

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        self._failures_unlogged += 1
        now = time.monotonic()
        if now - self._failure_logged_at >= CHECKPOINT_FAILURE_LOG_INTERVAL_S:
            _log.error(
                "head checkpoint not written: a deleted tail of the log may go undetected",
                path=str(self.path),
                error=str(exc),
                failures=self._failures_unlogged,
                interval_s=CHECKPOINT_FAILURE_LOG_INTERVAL_S,
            )
            self._failure_logged_at = now
            self._failures_unlogged = 0

    def close(self) -> None:
        """Write the last pending head at once, then stop the thread."""
        self._closing.set()
        self._thread.shutdown(wait=True)
