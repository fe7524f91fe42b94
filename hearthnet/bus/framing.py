"""The framing rules of an authenticated session, with no I/O (the sans-I/O shape of h11).

`Framing` is fed what the socket delivers — the fragments of each WebSocket message, then the
message's end — and returns what happened: a message to act on (`Received`, with its blob if it
announced one), a refused frame (`Refused`, already counted, maybe with an error to answer), or
`Disconnect` once PEER_MAX_PROTOCOL_ERRORS frames were refused. It also builds the frames to
send (`Framing.frames`) and keeps the request ids: which calls await an answer, so a late or
duplicate response is dropped. `hearthnet/bus/peer.py` drives it from the socket.

The rules: a message that announces a blob (`BlobRef`: SHA-256 and size) is followed by exactly
one binary message holding it, sent in BLOB_FRAGMENT_BYTES fragments. Each fragment is hashed as
it arrives (at most 1 MiB at a time, so well under a millisecond of work per call), never more
than the announced size is kept, and the blob is checked when its message ends. A blob over the
node's limit is refused from its announcement and its binary message discarded unread; a binary
message nobody announced, a text message where a blob was due, and hello/auth after the
handshake are refused. Joining the fragments of a large blob copies it, so `Received.join` is
left to the driver, which runs it off the event loop.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

from hearthnet import constants as C
from hearthnet.bus.protocol import (
    Auth,
    BlobRef,
    Hello,
    Message,
    Request,
    Response,
    _Msg,
    decode,
    encode,
)
from hearthnet.errors import ErrorCode, HearthnetError


@dataclass(frozen=True)
class Received:
    """A message to act on. `fragments` is its blob, already checked against its `BlobRef`
    (None when it announced none); `join` makes it one bytes object."""

    msg: Message
    fragments: tuple[bytes, ...] | None = None

    @property
    def blob_size(self) -> int:
        """Bytes in the blob (0 without one): the driver joins large ones off the loop."""
        return sum(len(f) for f in self.fragments or ())

    def join(self) -> bytes | None:
        """The blob as one bytes object (a copy; bytes.join releases the GIL for large ones)."""
        if self.fragments is None:
            return None
        return self.fragments[0] if len(self.fragments) == 1 else b"".join(self.fragments)


@dataclass(frozen=True)
class Refused:
    """A frame refused and counted. `kind` names it in stats and logs. When the refused part
    was the blob of `answer`, `error` says why: a `Request` is answered with it, the pending
    call of a `Response` fails with it."""

    kind: str
    reason: str
    answer: Request | Response | None = None
    error: HearthnetError | None = None


@dataclass(frozen=True)
class Disconnect:
    """Too many refused frames: close the connection (1008) and read nothing more."""

    reason: str


FramingEvent = Received | Refused | Disconnect


class Framing:
    """One session's framing state: the message being received, the blob announced and not yet
    arrived, refusals counted, ids in use. No asyncio, sockets or clocks."""

    def __init__(
        self,
        max_blob: int = C.BLOB_MAX_BYTES,
        max_errors: int = C.PEER_MAX_PROTOCOL_ERRORS,
        max_pending: int = C.MAX_PENDING_CALLS_PER_PEER,
    ) -> None:
        self.max_blob = max_blob
        self.max_errors = max_errors
        self.max_pending = max_pending
        self.errors = 0
        self.closing = False
        self._ids = itertools.count(1)
        self._awaiting: set[int] = set()  # ids of our requests with no answer yet
        self._announced: Request | Response | None = None  # its blob comes next
        self._discard_next_binary = False  # a refused announcement's blob
        # the message being received: "text", "blob" (announced), "skip" (discarded), or None
        self._kind: str | None = None
        self._texts: list[str] = []
        self._text_len = 0
        self._parts: list[bytes] = []
        self._blob_len = 0
        self._digest: Any = None

    # --- refusals -----------------------------------------------------------------------------

    def strike(self) -> bool:
        """Count one refused input (the driver's own refusals too: a request answered
        `bad_request` or `payload_too_large`, an invalid event); True when the connection must
        close now."""
        self.errors += 1
        if self.errors >= self.max_errors and not self.closing:
            self.closing = True
            return True
        return False

    def _refuse(
        self,
        events: list[FramingEvent],
        kind: str,
        reason: str,
        answer: Request | Response | None = None,
        error: HearthnetError | None = None,
    ) -> None:
        events.append(Refused(kind, reason, answer, error))
        if self.strike():
            events.append(Disconnect(f"{self.errors} refused frames"))

    # --- receiving ----------------------------------------------------------------------------

    def receive_fragment(self, data: str | bytes) -> list[FramingEvent]:
        """One fragment of a WebSocket message (str for text, bytes for binary); the first of a
        message decides what the message is."""
        if self.closing:
            return []
        events: list[FramingEvent] = []
        text = isinstance(data, str)
        if self._kind is not None and text != (self._kind == "text"):
            # a message of the other type before this one ended: the socket layer forbids it;
            # if it happens the unfinished one is abandoned (a blob due is then missing)
            self._kind = None
            self._reset_message()
        if self._kind is None:
            self._start(text, events)
        if self.closing:
            return events
        if isinstance(data, str):
            self._text_len += len(data)
            if self._text_len <= C.CONTROL_FRAME_MAX_BYTES:  # a char is at least one byte
                self._texts.append(data)
        elif self._kind == "blob":
            self._blob_len += len(data)
            assert self._announced is not None and self._announced.blob is not None
            if self._blob_len <= self._announced.blob.size:  # never keep more than announced
                self._digest.update(data)
                self._parts.append(data)
        return events

    def _start(self, text: bool, events: list[FramingEvent]) -> None:
        if text:
            self._kind = "text"
            self._discard_next_binary = False
            if self._announced is not None:
                waiting, self._announced = self._announced, None
                err = HearthnetError(ErrorCode.BAD_REQUEST, "blob missing")
                self._refuse(events, "missing_blob", "announced blob did not follow", waiting, err)
        elif self._discard_next_binary:
            self._discard_next_binary = False
            self._kind = "skip"
        elif self._announced is None:
            self._kind = "skip"
            self._refuse(events, "unexpected_binary", "binary frame without an announcement")
        else:
            self._kind = "blob"
            self._digest = hashlib.sha256()

    def end_message(self) -> list[FramingEvent]:
        """The current message ended: what it amounts to."""
        kind, self._kind = self._kind, None
        if self.closing or kind is None:
            self._reset_message()
            return []
        events: list[FramingEvent] = []
        if kind == "text":
            self._end_text(events)
        elif kind == "blob":
            self._end_blob(events)
        self._reset_message()
        return events

    def receive_message(self, data: str | bytes) -> list[FramingEvent]:
        """A whole message in one piece: `receive_fragment` then `end_message`."""
        return [*self.receive_fragment(data), *self.end_message()]

    def _reset_message(self) -> None:
        self._texts, self._text_len = [], 0
        self._parts, self._blob_len, self._digest = [], 0, None

    def _end_text(self, events: list[FramingEvent]) -> None:
        if self._text_len > C.CONTROL_FRAME_MAX_BYTES:
            reason = f"control frame of over {C.CONTROL_FRAME_MAX_BYTES} bytes"
            self._refuse(events, "oversize_frame", reason)
            return
        try:
            msg = decode("".join(self._texts))
        except HearthnetError as exc:
            oversize = exc.code is ErrorCode.PAYLOAD_TOO_LARGE
            self._refuse(events, "oversize_frame" if oversize else "malformed_frame", exc.message)
            return
        if isinstance(msg, Hello | Auth):
            self._refuse(events, "unexpected_message", f"unexpected {msg.t!r} after the handshake")
            return
        if isinstance(msg, Request | Response) and msg.blob is not None:
            if msg.blob.size > self.max_blob:
                self._discard_next_binary = True
                err = HearthnetError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"blob of {msg.blob.size} bytes exceeds {self.max_blob}",
                )
                reason = f"announced blob of {msg.blob.size} bytes"
                self._refuse(events, "oversize_blob", reason, msg, err)
                return
            self._announced = msg
            return
        self._deliver(events, Received(msg))

    def _end_blob(self, events: list[FramingEvent]) -> None:
        announced, self._announced = self._announced, None
        assert announced is not None and announced.blob is not None
        ref = announced.blob
        if self._blob_len != ref.size or self._digest.hexdigest() != ref.sha:
            err = HearthnetError(ErrorCode.BLOB_CORRUPT, "blob does not match its SHA-256")
            reason = "blob does not match its announced SHA-256"
            self._refuse(events, "blob_sha_mismatch", reason, announced, err)
            return
        self._deliver(events, Received(announced, tuple(self._parts) or (b"",)))

    def _deliver(self, events: list[FramingEvent], received: Received) -> None:
        msg = received.msg
        if isinstance(msg, Response):
            if msg.id not in self._awaiting:
                return  # a late answer to a call that timed out, or a second one
            self._awaiting.discard(msg.id)
        events.append(received)

    # --- sending ------------------------------------------------------------------------------

    def next_id(self) -> int:
        """A fresh id for a request or a subscription of ours."""
        return next(self._ids)

    def request(
        self, cap: str, body: dict[str, Any], timeout: float, blob: BlobRef | None
    ) -> Request:
        """A request with a fresh id, now awaiting its answer (until `settled`); refused
        `overloaded` past the pending-call cap and `payload_too_large` over the blob limit."""
        if len(self._awaiting) >= self.max_pending:
            raise HearthnetError(ErrorCode.OVERLOADED, "too many calls pending to this peer")
        if blob is not None and blob.size > self.max_blob:
            raise HearthnetError(ErrorCode.PAYLOAD_TOO_LARGE, "blob exceeds the transport limit")
        req_id = self.next_id()
        self._awaiting.add(req_id)
        return Request(t="req", id=req_id, cap=cap, body=body, timeout=timeout, blob=blob)

    def settled(self, req_id: int) -> None:
        """Our request `req_id` no longer waits (answered, timed out or failed): a response
        with its id that arrives later is dropped."""
        self._awaiting.discard(req_id)

    @property
    def awaiting(self) -> int:
        """Our requests still waiting for an answer."""
        return len(self._awaiting)

    @staticmethod
    def frames(msg: _Msg, blob: bytes | None = None) -> tuple[str, list[memoryview] | None]:
        """What to send for `msg`: its text frame, then (if it announces one) its blob as the
        BLOB_FRAGMENT_BYTES fragments of one binary message. Both must go back to back."""
        ref = getattr(msg, "blob", None)
        if (ref is None) != (blob is None) or (ref is not None and ref.size != len(blob or b"")):
            raise ValueError("a blob must be sent with exactly its announcement")
        if blob is None:
            return encode(msg), None
        view = memoryview(blob)
        step = C.BLOB_FRAGMENT_BYTES
        return encode(msg), [view[i : i + step] for i in range(0, len(view), step)] or [view]


def blob_ref(blob: bytes, sha: str) -> BlobRef:
    """The announcement of `blob` whose SHA-256 hex digest is `sha` (the driver hashes large
    blobs off the event loop)."""
    return BlobRef(sha=sha, size=len(blob))
