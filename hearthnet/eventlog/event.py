"""The event record and its hash chain, with no I/O.

An event's header is the JCS encoding of (version, seq, ts, type, actor, SHA-256 of the payload's
JCS bytes, previous hash). Its hash is the header's SHA-256 and its signature is the actor's
Ed25519 signature over the header. The stored payload bytes are what gets hashed: verification
checks bytes, never a re-serialisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hearthnet.canonical import canonical_bytes, parse_json, sha256_hex
from hearthnet.constants import EVENT_PAYLOAD_MAX_BYTES, EVENT_TYPE_MAX_LEN
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.identity import NodeID, NodeIdentity, verify

EVENT_FORMAT_VERSION = 1
_TYPE_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")


@dataclass(frozen=True)
class Event:
    """One sealed event: its header fields, the exact payload bytes that were hashed, the chain
    link and the actor's signature. Immutable: what was signed is what is kept."""

    seq: int
    ts: str
    type: str
    actor: NodeID
    payload_bytes: bytes
    prev_hash: str
    hash: str
    signature: bytes

    @property
    def payload(self) -> dict[str, Any]:
        """The payload parsed from its stored bytes (parsed each time: the bytes are the record)."""
        value = parse_json(self.payload_bytes, EVENT_PAYLOAD_MAX_BYTES)
        assert isinstance(value, dict)
        return value

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-safe values, for `hearthnet events` and status output."""
        return {
            "seq": self.seq,
            "ts": self.ts,
            "type": self.type,
            "actor": self.actor,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "signature": self.signature.hex(),
        }


def check_event_type(event_type: str) -> str:
    """Refuse a type that is not dotted lower-case words; types are matched by prefix."""
    if (
        not isinstance(event_type, str)
        or len(event_type) > EVENT_TYPE_MAX_LEN
        or not _TYPE_RE.match(event_type)
    ):
        raise HearthnetError(
            ErrorCode.EVENTLOG_INVALID, "event type must be dotted lower-case words"
        )
    return event_type


def encode_payload(payload: dict[str, Any]) -> bytes:
    """The payload's JCS bytes, bounded by EVENT_PAYLOAD_MAX_BYTES: what gets hashed and stored."""
    if not isinstance(payload, dict):
        raise HearthnetError(ErrorCode.EVENTLOG_INVALID, "event payload must be a JSON object")
    data = canonical_bytes(payload)
    if len(data) > EVENT_PAYLOAD_MAX_BYTES:
        raise HearthnetError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"event payload of {len(data)} bytes exceeds {EVENT_PAYLOAD_MAX_BYTES}",
        )
    return data


def header_bytes(
    seq: int, ts: str, event_type: str, actor: str, payload_bytes: bytes, prev_hash: str
) -> bytes:
    """The signed header: JCS of the fields, with the payload by its SHA-256."""
    return canonical_bytes(
        {
            "v": EVENT_FORMAT_VERSION,
            "seq": seq,
            "ts": ts,
            "type": event_type,
            "actor": actor,
            "payload_sha256": sha256_hex(payload_bytes),
            "prev_hash": prev_hash,
        }
    )


def now_ts() -> str:
    """An event timestamp: UTC, microseconds, `Z` suffix (informative only; `seq` orders)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seal(
    identity: NodeIdentity,
    seq: int,
    prev_hash: str,
    event_type: str,
    payload_bytes: bytes,
    ts: str,
) -> Event:
    """Make the event at `seq` after `prev_hash`: hash its header and sign it with `identity`."""
    header = header_bytes(seq, ts, event_type, identity.node_id, payload_bytes, prev_hash)
    return Event(
        seq=seq,
        ts=ts,
        type=event_type,
        actor=identity.node_id,
        payload_bytes=payload_bytes,
        prev_hash=prev_hash,
        hash=sha256_hex(header),
        signature=identity.sign(header),
    )


def check_link(event: Event, expected_seq: int, expected_prev: str, owner: str) -> str | None:
    """Why `event` is not the valid next link of `owner`'s chain, or None when it is."""
    if event.seq != expected_seq:
        return f"expected seq {expected_seq}, found {event.seq}"
    if event.prev_hash != expected_prev:
        return "prev_hash does not match the previous event's hash"
    if event.actor != owner:
        return "actor is not the log's owner"
    header = header_bytes(
        event.seq, event.ts, event.type, event.actor, event.payload_bytes, event.prev_hash
    )
    if sha256_hex(header) != event.hash:
        return "hash does not match the event's contents"
    if not verify(event.actor, header, event.signature):
        return "signature does not verify"
    try:
        event.payload  # noqa: B018 - parsing is the check
    except HearthnetError as exc:
        return f"payload is not valid JSON: {exc.message}"
    return None


def to_wire(event: Event) -> dict[str, Any]:
    """An event for a peer: the payload travels as its exact JCS text, the signature as hex."""
    return {
        "seq": event.seq,
        "ts": event.ts,
        "type": event.type,
        "actor": event.actor,
        "payload": event.payload_bytes.decode("utf-8"),
        "prev_hash": event.prev_hash,
        "hash": event.hash,
        "signature": event.signature.hex(),
    }


def from_wire(data: Any, expected_actor: str) -> Event:
    """An event received from `expected_actor`, its hash and signature checked on its own
    (a subscriber sees a filtered stream, so the chain itself cannot be checked here)."""
    try:
        event = Event(
            seq=int(data["seq"]),
            ts=str(data["ts"]),
            type=check_event_type(data["type"]),
            actor=NodeID(str(data["actor"])),
            payload_bytes=str(data["payload"]).encode("utf-8"),
            prev_hash=str(data["prev_hash"]),
            hash=str(data["hash"]),
            signature=bytes.fromhex(str(data["signature"])),
        )
    except (KeyError, TypeError, ValueError, HearthnetError):
        raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "malformed event from peer") from None
    header = header_bytes(
        event.seq, event.ts, event.type, event.actor, event.payload_bytes, event.prev_hash
    )
    if (
        event.actor != expected_actor
        or sha256_hex(header) != event.hash
        or not verify(event.actor, header, event.signature)
    ):
        raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "event from peer does not verify")
    try:
        event.payload  # noqa: B018 - parsing is the check
    except HearthnetError:
        raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "event payload is malformed") from None
    return event
