"""Canonical JSON (RFC 8785 JCS) for everything hearthnet signs or hashes.

Serialisation goes through the `rfc8785` library; values JCS cannot represent exactly (NaN, ±Inf,
integers beyond 2^53, non-string keys) are errors rather than silent changes. The parser refuses
what a signature check could be fooled by: duplicate keys, NaN/Infinity literals, over-deep or
oversized documents.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785

from hearthnet.constants import JSON_MAX_DEPTH, SIGNED_JSON_MAX_BYTES
from hearthnet.errors import ErrorCode, HearthnetError


def canonical_bytes(obj: Any) -> bytes:
    """The JCS encoding of `obj`; `canonical_invalid` for anything JCS cannot hold exactly."""
    try:
        return rfc8785.dumps(obj)
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise HearthnetError(ErrorCode.CANONICAL_INVALID, f"not canonicalisable: {exc}") from exc


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256, the one digest every hash in hearthnet uses."""
    return hashlib.sha256(data).hexdigest()


def canonical_sha256(obj: Any) -> str:
    """SHA-256 of `obj`'s JCS bytes: the identity of a signed document."""
    return sha256_hex(canonical_bytes(obj))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HearthnetError(ErrorCode.CANONICAL_INVALID, f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise HearthnetError(ErrorCode.CANONICAL_INVALID, f"{name} is not valid JSON")


_SAFE_INT = 2**53 - 1


def _parse_int(text: str) -> int | float:
    """JCS numbers are IEEE doubles: an integer beyond 2^53 denotes the nearest double, as in
    ECMAScript (JCS writes a large double as its shortest round-trip digits, e.g.
    37610419734236070). `parse_canonical` still refuses text that is not canonical."""
    value = int(text)
    return value if -_SAFE_INT <= value <= _SAFE_INT else float(value)


def _depth(obj: Any) -> int:
    """Nesting depth (a scalar is 1, `[1]` is 2). Only containers are pushed, so a long flat
    array costs one comprehension, not a stack entry per element (issue 13)."""
    if not isinstance(obj, dict | list):
        return 1
    deepest, stack = 1, [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if children and depth + 1 > deepest:
            deepest = depth + 1
        stack.extend([(v, depth + 1) for v in children if isinstance(v, dict | list)])
    return deepest


def parse_json(data: bytes | str, max_bytes: int = SIGNED_JSON_MAX_BYTES) -> Any:
    """Strictly parse untrusted JSON; any problem is `canonical_invalid`."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise HearthnetError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"JSON document of {len(raw)} bytes exceeds {max_bytes}"
        )
    try:
        obj = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_int=_parse_int,
        )
    except HearthnetError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HearthnetError(ErrorCode.CANONICAL_INVALID, f"malformed JSON: {exc}") from exc
    if _depth(obj) > JSON_MAX_DEPTH:
        raise HearthnetError(ErrorCode.CANONICAL_INVALID, "JSON nested too deeply")
    return obj


def parse_canonical(data: bytes, max_bytes: int = SIGNED_JSON_MAX_BYTES) -> Any:
    """Parse JSON that must already be in canonical form (signed bytes from a peer)."""
    obj = parse_json(data, max_bytes)
    if canonical_bytes(obj) != data:
        raise HearthnetError(ErrorCode.CANONICAL_INVALID, "JSON is not in canonical (JCS) form")
    return obj
