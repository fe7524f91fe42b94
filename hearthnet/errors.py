"""The one exception type that crosses module and wire boundaries.

Callers match on `code`, never on message text, so every failure carries one of the codes in
`ErrorCode` (listed with their meaning in docs/architecture.md, "Errors"). `to_dict`/`from_dict`
let an error travel over the wire and arrive with the code it was raised with.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class ErrorCode(StrEnum):
    """Every error code a caller can match on, local or from a peer; values are wire strings."""

    # federated rounds
    EXPERIMENTAL_DISABLED = "experimental_disabled"
    SIGNATURE_INVALID = "signature_invalid"
    BASE_MODEL_MISMATCH = "base_model_mismatch"
    INSUFFICIENT_RESOURCES = "insufficient_resources"
    CONSENT_REQUIRED = "consent_required"
    ROUND_FULL = "round_full"
    ROUND_CLOSED = "round_closed"
    DELTA_INVALID = "delta_invalid"
    FEDLEARN_AGGREGATION_FAILED = "fedlearn_aggregation_failed"
    FEDLEARN_MIN_PARTICIPANTS_UNMET = "fedlearn_min_participants_unmet"
    FEDLEARN_AGGREGATOR_UNREACHABLE = "fedlearn_aggregator_unreachable"
    ADAPTER_NOT_FOUND = "adapter_not_found"
    # an adapter that makes this node's own held-out text worse (issue 12)
    ADAPTER_REJECTED = "adapter_rejected"
    # foundation
    CONFIG_INVALID = "config_invalid"
    IDENTITY_INVALID = "identity_invalid"
    KEY_FILE_INSECURE = "key_file_insecure"
    CANONICAL_INVALID = "canonical_invalid"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    EVENTLOG_INVALID = "eventlog_invalid"
    EVENTLOG_LOCKED = "eventlog_locked"
    SUBSCRIPTION_OVERFLOW = "subscription_overflow"
    BLOB_NOT_FOUND = "blob_not_found"
    BLOB_CORRUPT = "blob_corrupt"
    # fedlearn data plane
    MANIFEST_INVALID = "manifest_invalid"
    # robust aggregation and reputation (issue 7)
    FEDLEARN_TOLERANCE_EXCEEDED = "fedlearn_tolerance_exceeded"
    REPUTATION_TOO_LOW = "reputation_too_low"
    # a participant's privacy budget (issue 15)
    PRIVACY_BUDGET_EXCEEDED = "privacy_budget_exceeded"
    # capability bus and transport
    UNKNOWN_CAPABILITY = "unknown_capability"
    TIMEOUT = "timeout"
    PEER_NOT_CONNECTED = "peer_not_connected"
    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    OVERLOADED = "overloaded"
    INTERNAL_ERROR = "internal_error"
    HANDSHAKE_FAILED = "handshake_failed"
    # the listen address is taken by another process (issue 12)
    ADDRESS_IN_USE = "address_in_use"
    # LLM and trainer
    MODEL_UNAVAILABLE = "model_unavailable"
    DATA_INVALID = "data_invalid"
    CANCELLED = "cancelled"
    # a peer sent an error whose code this node does not know
    PROTOCOL_ERROR = "protocol_error"


class HearthnetError(Exception):
    """A failure with a stable code, a human message and optional JSON-safe detail."""

    def __init__(self, code: ErrorCode, message: str, detail: dict[str, Any] | None = None):
        super().__init__(f"[{code.value}] {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.detail = detail

    def to_dict(self) -> dict[str, Any]:
        """The error as JSON for the wire or the control socket; `from_dict` reverses it."""
        out: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.detail is not None:
            out["detail"] = self.detail
        return out

    @classmethod
    def from_dict(cls, data: Any) -> HearthnetError:
        """Rebuild an error sent by a peer; anything malformed becomes `protocol_error`."""
        if not isinstance(data, dict):
            return cls(ErrorCode.PROTOCOL_ERROR, "malformed error object")
        message = data.get("message")
        detail = data.get("detail")
        if not isinstance(message, str) or (detail is not None and not isinstance(detail, dict)):
            return cls(ErrorCode.PROTOCOL_ERROR, "malformed error object")
        try:
            code = ErrorCode(str(data.get("code")))
        except ValueError:
            return cls(
                ErrorCode.PROTOCOL_ERROR,
                message,
                {"remote_code": str(data.get("code"))[:64]},
            )
        return cls(code, message, detail)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HearthnetError) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.code, self.message))


def first_problem(exc: ValidationError, default: str) -> tuple[str, str]:
    """(dotted location, reason) of a pydantic error's first problem, for a message that names
    the offending field."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or default
    return where, str(err["msg"]).removeprefix("Value error, ")
