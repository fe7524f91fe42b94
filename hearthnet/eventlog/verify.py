"""Holding the log to its chain and its signed head checkpoint: the verify walk, the check a
writer makes on open, and adopting a checkpoint for a log from before them.

Plain functions of a connection, run on the log's worker thread (hearthnet/eventlog/store.py)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from hearthnet.constants import GENESIS_HASH
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog.checkpoint import (
    CHECKPOINTED_GENESIS_HASH,
    Checkpoint,
    check_head,
    check_marker,
    read_checkpoint,
)
from hearthnet.eventlog.event import Event, check_link, encode_payload, now_ts, seal
from hearthnet.eventlog.rows import COLUMNS, hash_at, row_to_event
from hearthnet.identity import NodeID, NodeIdentity

# Recorded when a writer opens a non-empty log from before head checkpoints: the log itself
# says from where on a deleted tail is detectable, and that a checkpoint must exist from then on.
HEAD_ADOPTED_EVENT = "eventlog.head.adopted"


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of `EventLog.verify`: how many events checked out and, if not ok, the first
    bad seq and why."""

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None


def marker_seq(db: sqlite3.Connection) -> int | None:
    """From which event on the log's own signed events say it has a checkpoint: 1 for a log
    created with checkpoints, the first adoption event for an older one, None for neither."""
    row = db.execute("SELECT prev_hash FROM events WHERE seq = 1").fetchone()
    if row is not None and row[0] == CHECKPOINTED_GENESIS_HASH:
        return 1
    row = db.execute("SELECT min(seq) FROM events WHERE type = ?", (HEAD_ADOPTED_EVENT,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def check_on_open(
    db: sqlite3.Connection, path: Path, checkpoint_file: Path, owner: NodeID, head_seq: int
) -> tuple[Checkpoint | None, int | None]:
    """Refuse to write on a log that ends before its checkpoint, or that records having one
    it lacks (appending would overwrite the evidence). Returns the checkpoint and the marker
    seq, so the writer knows whether to write one and whether to adopt (`adoption_event`)."""
    fix = (
        f"restore {path} and {checkpoint_file} from a backup of this node's "
        f"data_dir, or move {path}* aside to start a new, empty log"
    )
    try:
        checkpoint = read_checkpoint(checkpoint_file, owner)
    except HearthnetError as exc:
        raise HearthnetError(ErrorCode.EVENTLOG_INVALID, f"{exc.message}; {fix}") from None
    marker = marker_seq(db)
    reason = check_marker(marker, checkpoint)
    if checkpoint is not None and reason is None:
        reason = check_head(checkpoint, head_seq, hash_at(db, checkpoint.seq))
    if reason is not None:
        raise HearthnetError(ErrorCode.EVENTLOG_INVALID, f"{path}: {reason}; {fix}")
    return checkpoint, marker


def adoption_event(identity: NodeIdentity, seq: int, prev: str) -> Event:
    """The event that marks a log from before checkpoints as checkpointed from here on, in the
    log itself (its writer checkpoints the head first, so the file is never missing or behind
    the marker, even after a crash between the two)."""
    return seal(
        identity,
        seq + 1,
        prev,
        HEAD_ADOPTED_EVENT,
        encode_payload({"seq": seq, "hash": prev}),
        now_ts(),
    )


def walk(db: sqlite3.Connection, checkpoint_file: Path, owner: NodeID) -> VerifyResult:
    """Walk the whole chain; name the first event that is missing, altered or forged; then
    hold its end to the signed head checkpoint, so a deleted tail is named too. A log with
    no checkpoint fails: without one a deleted tail cannot be told from a short log; one
    whose events record that it had one says the checkpoint was deleted."""
    # Read before the chain: the writer checkpoints only committed events, so this is
    # never ahead of the snapshot the SELECT below sees, even with the node running.
    checkpoint: Checkpoint | None = None
    unreadable: str | None = None
    try:
        checkpoint = read_checkpoint(checkpoint_file, owner)
    except HearthnetError as exc:
        unreadable = f"{exc.message} ({checkpoint_file})"
    hash_at_checkpoint: str | None = None
    marker: int | None = None
    expected_seq, prev, checked = 1, GENESIS_HASH, 0
    cursor = db.execute(f"SELECT {COLUMNS} FROM events ORDER BY seq")  # noqa: S608
    while True:
        try:
            rows = cursor.fetchmany(1000)
        except sqlite3.OperationalError:  # a text column that is not UTF-8 any more
            bad = _undecodable_from(db, expected_seq)
            return VerifyResult(False, checked, bad, "row holds bytes that are not text")
        if not rows:
            break
        for row in rows:
            try:
                event = row_to_event(row)
            except (TypeError, ValueError):
                return VerifyResult(False, checked, int(row[0]), "malformed row")
            if expected_seq == 1 and event.prev_hash == CHECKPOINTED_GENESIS_HASH:
                prev, marker = CHECKPOINTED_GENESIS_HASH, 1
            reason = check_link(event, expected_seq, prev, owner)
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
        restore = f"restore {checkpoint_file} from a backup of this node's data_dir"
        return VerifyResult(False, checked, None, f"{reason}; {restore}")
    if checkpoint is None:
        no_checkpoint = (
            f"no head checkpoint {checkpoint_file}: a deleted tail cannot be "
            "detected (a log from before checkpoints gets one when its node next starts)"
        )
        return VerifyResult(False, checked, None, no_checkpoint)
    reason = check_head(checkpoint, expected_seq - 1, hash_at_checkpoint)
    if reason is not None:
        bad = min(expected_seq, checkpoint.seq)
        return VerifyResult(False, checked, bad, reason)
    return VerifyResult(True, checked)


def _undecodable_from(db: sqlite3.Connection, start: int) -> int:
    """The first row from `start` that sqlite cannot hand back as text."""
    seqs = db.execute("SELECT seq FROM events WHERE seq >= ? ORDER BY seq", (start,))
    for (seq,) in seqs.fetchall():
        try:
            db.execute(
                f"SELECT {COLUMNS} FROM events WHERE seq = ?",  # noqa: S608
                (seq,),
            ).fetchone()
        except sqlite3.OperationalError:
            return int(seq)
    return start
