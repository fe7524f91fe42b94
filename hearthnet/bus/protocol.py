"""The wire protocol's message shapes, with no I/O (the h11 way: parse, validate, encode).

Control messages are JSON text frames, one object each, discriminated by `t`. A message that
announces a blob (`blob: {sha, size}`) is followed by exactly one binary frame holding it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from hearthnet import constants as C
from hearthnet.canonical import parse_json
from hearthnet.errors import ErrorCode, HearthnetError, first_problem

_HEX_NONCE = rf"^[0-9a-f]{{{2 * C.HANDSHAKE_NONCE_BYTES}}}$"
_CAP = r"^[a-z0-9_]+(\.[a-z0-9_]+)*$"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class BlobRef(_Msg):
    """Announces the binary frame that follows: its SHA-256 and size, checked on arrival."""

    sha: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(ge=0)]


class Hello(_Msg):
    """The first frame each side sends: version, network, role, NodeID and a fresh nonce."""

    t: Literal["hello"]
    v: str
    net: Annotated[str, Field(max_length=C.NETWORK_ID_MAX_LEN)]
    role: Literal["dialer", "listener"]
    node: Annotated[str, Field(max_length=128)]
    nonce: Annotated[str, Field(pattern=_HEX_NONCE)]


class Auth(_Msg):
    """The handshake signature over the transcript (see handshake.py)."""

    t: Literal["auth"]
    sig: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]


class Request(_Msg):
    """A capability call; `id` pairs it with its `Response`."""

    t: Literal["req"]
    id: Annotated[int, Field(ge=0, le=2**53 - 1)]
    cap: Annotated[str, Field(max_length=C.CAPABILITY_NAME_MAX_LEN, pattern=_CAP)]
    body: dict[str, Any]
    timeout: Annotated[float, Field(gt=0, le=C.CALL_TIMEOUT_MAX_S)] = C.CALL_TIMEOUT_DEFAULT_S
    blob: BlobRef | None = None


class Response(_Msg):
    """The answer to the `Request` with the same `id`: a body, or an error dict."""

    t: Literal["res"]
    id: Annotated[int, Field(ge=0, le=2**53 - 1)]
    ok: bool
    body: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    blob: BlobRef | None = None


class Subscribe(_Msg):
    """Ask for the peer's events under `prefix`, with the backlog after `after_seq` if given."""

    t: Literal["sub"]
    id: Annotated[int, Field(ge=0, le=2**53 - 1)]
    prefix: Annotated[str, Field(max_length=C.EVENT_TYPE_MAX_LEN)]
    after_seq: Annotated[int, Field(ge=0)] | None = None


class Unsubscribe(_Msg):
    """End the subscription `id`."""

    t: Literal["unsub"]
    id: Annotated[int, Field(ge=0, le=2**53 - 1)]


class EventMsg(_Msg):
    """One event of a subscription, or its end (`event` None, `error` saying why if not clean)."""

    t: Literal["evt"]
    sub: Annotated[int, Field(ge=0, le=2**53 - 1)]
    event: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


Message = Annotated[
    Hello | Auth | Request | Response | Subscribe | Unsubscribe | EventMsg,
    Field(discriminator="t"),
]
_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


def _values_bound(raw: bytes) -> int:
    """An upper bound on the JSON values in `raw`, at byte-scan cost: every value but the
    first follows a ',' or opens a container's first element after '[' or '{'. Bytes inside
    strings count too, so it over-counts; it never under-counts."""
    return 1 + raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def decode(text: str | bytes) -> Message:
    """A validated message from an untrusted text frame; `bad_request` when it is not one,
    `payload_too_large` before any parsing when it is over the size or JSON-value bound (so a
    hostile frame costs a byte scan, not a parse)."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > C.CONTROL_FRAME_MAX_BYTES:
        raise HearthnetError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"control frame of {len(raw)} bytes exceeds {C.CONTROL_FRAME_MAX_BYTES}",
        )
    values = _values_bound(raw)
    if values > C.CONTROL_FRAME_MAX_JSON_VALUES:
        raise HearthnetError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"control frame may hold {values} JSON values, over {C.CONTROL_FRAME_MAX_JSON_VALUES}",
        )
    try:
        obj = parse_json(raw, C.CONTROL_FRAME_MAX_BYTES)
        return _ADAPTER.validate_python(obj)
    except HearthnetError as exc:
        raise HearthnetError(ErrorCode.BAD_REQUEST, f"malformed frame: {exc.message}") from None
    except ValidationError as exc:
        where, reason = first_problem(exc, "frame")
        raise HearthnetError(
            ErrorCode.BAD_REQUEST, f"malformed frame at {where}: {reason}"
        ) from None


def encode(msg: _Msg) -> str:
    """The compact JSON text frame for `msg` (fields left at None are not sent)."""
    return json.dumps(msg.model_dump(exclude_none=True), separators=(",", ":"), allow_nan=False)
