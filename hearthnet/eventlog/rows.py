"""The event log's SQLite side: schema, connection settings and the row <-> Event codec.

Plain functions of a connection, run on the log's worker thread (hearthnet/eventlog/store.py)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hearthnet.constants import EVENTLOG_BUSY_TIMEOUT_S
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog.checkpoint import CHECKPOINTED_GENESIS_HASH
from hearthnet.eventlog.event import Event
from hearthnet.identity import NodeID

SCHEMA = """
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
COLUMNS = "seq, ts, type, actor, payload, prev_hash, hash, signature"


def row_to_event(row: tuple[Any, ...]) -> Event:
    """An Event from a row selected as COLUMNS; TypeError/ValueError if the row is malformed."""
    seq, ts, typ, actor, payload, prev_hash, hsh, sig = row
    return Event(seq, ts, typ, NodeID(actor), bytes(payload), prev_hash, hsh, bytes(sig))


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """Open the database: a writer gets WAL with synchronous=FULL (an append that returned
    survives a crash) and the schema; a reader opens read-only. Either way the table must read."""
    try:
        if readonly:
            db = sqlite3.connect(
                f"file:{path}?mode=ro",
                uri=True,
                timeout=EVENTLOG_BUSY_TIMEOUT_S,
                check_same_thread=False,
            )
        else:
            db = sqlite3.connect(path, timeout=EVENTLOG_BUSY_TIMEOUT_S, check_same_thread=False)
            os.chmod(path, 0o600)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
        db.execute("SELECT count(*) FROM events").fetchone()
    except sqlite3.DatabaseError as exc:
        raise HearthnetError(
            ErrorCode.EVENTLOG_INVALID, f"{path} is not a readable event log: {exc}"
        ) from None
    return db


def read_head(db: sqlite3.Connection) -> tuple[int, str]:
    """The last event's seq and hash; for an empty log, the genesis its first event links
    to, which marks the log as checkpointed from its start (checkpoint.py)."""
    row = db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, CHECKPOINTED_GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))


def hash_at(db: sqlite3.Connection, seq: int) -> str | None:
    """The hash of event `seq`, None if there is none."""
    row = db.execute("SELECT hash FROM events WHERE seq = ?", (seq,)).fetchone()
    return None if row is None else str(row[0])


def insert(db: sqlite3.Connection, event: Event) -> None:
    """Commit one event."""
    with db:
        db.execute(
            f"INSERT INTO events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
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


def select(
    db: sqlite3.Connection,
    after_seq: int,
    types: Iterable[str] | None,
    type_prefix: str | None,
    limit: int,
) -> list[Event]:
    """Events after `after_seq`, optionally of exact `types` or a `type_prefix`, at most `limit`."""
    sql = f"SELECT {COLUMNS} FROM events WHERE seq > ?"  # noqa: S608
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
    return [row_to_event(r) for r in db.execute(sql, params).fetchall()]
