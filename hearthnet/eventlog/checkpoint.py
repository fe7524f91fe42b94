"""The signed head checkpoint: what makes a deleted tail of the event log visible.

A hash chain proves every event links to the one before, but a log whose last events were
deleted is still a valid chain. So after every committed append the writer also records the
head (owner, seq, hash of the last event), signed with the node's key, in a separate file beside
the database (`events.sqlite3.head`); `EventLog.verify` then fails a log that ends before the
checkpoint's seq, or whose event at that seq has another hash. It is written only after the
append is committed, so it is never ahead of the durable log. See docs/decisions.md.

Deleting the file must not undo this, so the log itself says that it has one: a log created
with checkpoints starts its chain from CHECKPOINTED_GENESIS_HASH instead of the all-zero
genesis (in event 1's signed header, so no event is added), and an older log gets an
`eventlog.head.adopted` event when its head is first checkpointed. A log holding either marker
but no checkpoint (or one from before the marker) fails verify, and the node will not start.

The encoding, signing and comparison below do no I/O; `read_checkpoint`/`write_checkpoint` do.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hearthnet.canonical import canonical_bytes, parse_canonical, sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.files import replace_file
from hearthnet.identity import NodeID, NodeIdentity, verify

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_SUFFIX = ".head"
CHECKPOINT_MAX_BYTES = 4096
# Event 1's prev_hash in a log created with checkpoints: the signed mark that this log has had a
# checkpoint from its first event on (a log from before them links event 1 to GENESIS_HASH).
CHECKPOINTED_GENESIS_HASH = sha256_hex(b"hearthnet.eventlog.genesis.checkpointed")
# Signed bodies name their purpose, so this signature can never pass for an event header's.
_PURPOSE = "hearthnet.eventlog.head"


@dataclass(frozen=True)
class Checkpoint:
    """A verified head checkpoint: the log of `owner` reached `seq`, whose event hash is `hash`."""

    owner: NodeID
    seq: int
    hash: str


def checkpoint_path(log_path: Path) -> Path:
    """Where the checkpoint for the log at `log_path` lives: beside it, never inside it."""
    return log_path.with_name(log_path.name + CHECKPOINT_SUFFIX)


def _body(owner: str, seq: int, hsh: str) -> bytes:
    return canonical_bytes(
        {
            "purpose": _PURPOSE,
            "v": CHECKPOINT_FORMAT_VERSION,
            "owner": owner,
            "seq": seq,
            "hash": hsh,
        }
    )


def encode_checkpoint(identity: NodeIdentity, seq: int, hsh: str) -> bytes:
    """The file contents: the signed body plus its signature, as canonical JSON."""
    signature = identity.sign(_body(identity.node_id, seq, hsh))
    return canonical_bytes(
        {
            "v": CHECKPOINT_FORMAT_VERSION,
            "owner": identity.node_id,
            "seq": seq,
            "hash": hsh,
            "signature": signature.hex(),
        }
    )


def _invalid(why: str) -> HearthnetError:
    return HearthnetError(ErrorCode.EVENTLOG_INVALID, f"head checkpoint {why}")


def decode_checkpoint(data: bytes, owner: str) -> Checkpoint:
    """The checkpoint in `data` if `owner` signed it; `eventlog_invalid` saying why otherwise."""
    try:
        obj = parse_canonical(data, CHECKPOINT_MAX_BYTES)
    except HearthnetError as exc:
        raise _invalid(f"is unreadable: {exc.message}") from None
    if not isinstance(obj, dict) or set(obj) != {"v", "owner", "seq", "hash", "signature"}:
        raise _invalid("is unreadable: not a checkpoint record")
    seq, hsh, sig = obj["seq"], obj["hash"], obj["signature"]
    if obj["v"] != CHECKPOINT_FORMAT_VERSION:
        raise _invalid(f"has unknown format version {obj['v']!r}")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not isinstance(hsh, str):
        raise _invalid("is unreadable: bad seq or hash")
    if obj["owner"] != owner:
        raise _invalid("belongs to another node")
    try:
        signature = bytes.fromhex(sig) if isinstance(sig, str) else b""
    except ValueError:
        signature = b""
    if not verify(owner, _body(owner, seq, hsh), signature):
        raise _invalid("signature does not verify")
    return Checkpoint(NodeID(owner), seq, hsh)


def check_head(checkpoint: Checkpoint, last_seq: int, hash_at_seq: str | None) -> str | None:
    """Why a valid chain ending at `last_seq` is not the one `checkpoint` signed, or None.

    `hash_at_seq` is the hash of the log's event at `checkpoint.seq` (None when it has none)."""
    if last_seq < checkpoint.seq:
        return (
            f"events {last_seq + 1}..{checkpoint.seq} missing after the last one "
            f"(seq {last_seq}): the log was truncated"
        )
    if checkpoint.seq > 0 and hash_at_seq != checkpoint.hash:
        return (
            f"event {checkpoint.seq} is not the one the head checkpoint signed: "
            "the log was rewritten"
        )
    return None


def check_marker(marker_seq: int | None, checkpoint: Checkpoint | None) -> str | None:
    """Why a log whose own events say it has been checkpointed since `marker_seq` (1 for a log
    created with checkpoints, the `eventlog.head.adopted` event's seq for an older one; None
    when it has neither) cannot be holding `checkpoint`, or None.

    The writer signs the head before the marker at `marker_seq` (at creation, or the old head
    before adopting), so from then on a checkpoint of at least `marker_seq - 1` exists."""
    if marker_seq is None:
        return None
    if checkpoint is None:
        return (
            f"the log records a head checkpoint from event {marker_seq} on, but there is none: "
            "it was deleted"
        )
    if checkpoint.seq < marker_seq - 1:
        return (
            f"the head checkpoint (seq {checkpoint.seq}) is older than the log's record of "
            f"checkpoints from event {marker_seq} on: it was replaced"
        )
    return None


def read_checkpoint(path: Path, owner: str) -> Checkpoint | None:
    """The checkpoint at `path`, None when there is no file; `eventlog_invalid` when unusable.

    Opened without following a link and without blocking, and anything but a regular file is
    refused: a FIFO or device planted at the path must fail verify, not hang it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise _invalid("is a symbolic link, not a regular file") from None
        raise _invalid(f"cannot be read: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _invalid("is not a regular file")
        data = b""
        while len(data) <= CHECKPOINT_MAX_BYTES:
            chunk = os.read(fd, CHECKPOINT_MAX_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise _invalid(f"cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    return decode_checkpoint(data, owner)


def write_checkpoint(path: Path, data: bytes) -> None:
    """Replace the checkpoint atomically (`files.replace_file`): a reader sees the old file or
    the new, whole, so verify never meets an empty or partial one; after a crash the rename may
    be lost and the previous checkpoint come back, which is behind the log, never ahead."""
    replace_file(path, data)
