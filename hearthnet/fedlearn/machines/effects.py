"""What a round machine asks its driver to do: plain data, shared by every role.

A machine never performs I/O; it returns these in order and the driver carries them out in that
order. `Append` is the one that changes state: the driver appends the event, then feeds the
stored record back to the machine (`apply`), so the live path and the fold of a restarted node
are the same code (docs/decisions.md, issue 14).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hearthnet.fedlearn.events import ROUND_PREFIX, Payload
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.reputation import Observation
from hearthnet.fedlearn.secagg import Unmasked
from hearthnet.fedlearn.submission import ParticipantSubmission


@dataclass(frozen=True)
class Append:
    """Append `payload` to the log as event `type`, then `apply` it to the machine."""

    type: str
    payload: Payload


def round_append(suffix: str, payload: Payload) -> Append:
    """A coordinator's `fedlearn.round.<suffix>` event."""
    return Append(ROUND_PREFIX + suffix, payload)


@dataclass(frozen=True)
class SetTimer:
    """Call the machine's `timer(name, now)` at `at` (a later SetTimer of that name replaces it)."""

    name: str
    at: datetime


@dataclass(frozen=True)
class StoreBlob:
    """Put bytes in the node's blob store (content-addressed: its SHA is known beforehand)."""

    data: bytes


@dataclass(frozen=True)
class Aggregate:
    """Run `aggregation.run.aggregate_submissions` over these (blocking: in a thread) and feed
    the outcome back. `blobs` maps each submission's delta SHA to the stored blob's SHA."""

    signed: SignedManifest
    submissions: Mapping[str, ParticipantSubmission]
    blobs: Mapping[str, str]
    unmasked: Unmasked | None  # secure rounds: the recovered secrets that remove the masks
    influence: Mapping[str, float]


@dataclass(frozen=True)
class RecordReputation:
    """Log the reputation changes a round this node aggregated produced (once per round)."""

    round_id: str
    observed: list[Observation]


@dataclass(frozen=True)
class Finalize:
    """Close the round `round_id` now, in the background (its caller does not wait)."""

    round_id: str


@dataclass(frozen=True)
class Call:
    """Call `capability` on `peer` (this node's own id: a local call) and feed the answer back
    with the machine's `reply(name, ...)`. While `retry_until` has not passed, an unreachable
    peer is retried (the driver's policy; the machine only names the limit)."""

    name: str
    peer: str
    capability: str
    body: dict[str, Any]
    blob: bytes | None = None
    retry_until: datetime | None = None


@dataclass(frozen=True)
class Log:
    """An operator log line."""

    level: str
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


Effect = Append | SetTimer | StoreBlob | Aggregate | RecordReputation | Finalize | Call | Log
