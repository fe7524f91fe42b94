"""Closing a round: the one finalize a coordinator and a taker both run.

Two pure steps. `plan` takes the round's valid signed submissions (with their join receipts and,
for secure rounds, the mask keys) and decides: too few to aggregate (`Abort`), or an
`effects.Aggregate` request for the driver. `publish` takes the aggregate the driver computed
and gives the signed result, the adapter's SHA and the reputation observations. The same
submissions give the same adapter bytes on every node (docs/decisions.md); only the signer, the
time and the `takeover` flag of the result differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from hearthnet.canonical import sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.run import observations, receipt_influence
from hearthnet.fedlearn.machines import effects as fx
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.protocol import Exclusion, SignedDoc
from hearthnet.fedlearn.publish import Aggregate, build_result
from hearthnet.fedlearn.reputation import Observation
from hearthnet.fedlearn.secagg import Unmasked
from hearthnet.fedlearn.state import Submitted
from hearthnet.identity import NodeIdentity

NOT_SUBMITTED = "no valid submission before the deadline"


@dataclass(frozen=True)
class Abort:
    """The round ends without a result, with this code and reason."""

    code: ErrorCode
    reason: str

    def error(self) -> HearthnetError:
        """The refusal the caller of finalize sees."""
        return HearthnetError(self.code, self.reason)


@dataclass(frozen=True)
class Published:
    """A finalized round: the signed result, its adapter, and what it showed of each member."""

    doc: SignedDoc
    adapter: bytes
    adapter_sha: str
    observed: list[Observation]
    included: list[str]


def plan(
    signed: SignedManifest,
    submissions: Mapping[str, Submitted],
    receipts: Mapping[str, SignedDoc],
    unmasked: Unmasked | None,
    takeover: bool = False,
) -> Abort | fx.Aggregate:
    """Abort below `min_participants`, or for a secure round whose secrets were not recovered
    (too few survivors to reveal a sum; a takeover, which holds no reveals); otherwise what to
    aggregate."""
    m = signed.manifest
    n = len(submissions)
    if n < m.min_participants:
        said = f"takeover gathered {n} submissions" if takeover else f"{n} valid submissions"
        return Abort(
            ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET,
            f"{said}; the round needs {m.min_participants}",
        )
    if m.secure and unmasked is None:
        why = (
            "a secure round is unmasked only by its coordinator, from its members' reveals"
            if takeover
            else f"{n} submissions survived: too few to unmask without revealing one update"
        )
        return Abort(ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET, why)
    return fx.Aggregate(
        signed=signed,
        submissions={p: s.submission for p, s in sorted(submissions.items())},
        blobs={s.submission.delta_sha: s.blob_sha for s in submissions.values()},
        unmasked=unmasked if m.secure else None,
        influence=receipt_influence({p: receipts[p] for p in submissions}),
    )


def aggregation_failed(err: HearthnetError) -> Abort:
    """Any failure of the aggregation itself aborts the round as `fedlearn_aggregation_failed`."""
    return Abort(ErrorCode.FEDLEARN_AGGREGATION_FAILED, err.message)


def exclusions(
    reasons: Mapping[str, str], joined: Iterable[str], included: Iterable[str]
) -> dict[str, str]:
    """Why each participant is not in the result: its own reason, or, for one that joined and
    sent nothing valid, `NOT_SUBMITTED`."""
    out = dict(reasons)
    inside = set(included)
    for p in joined:
        if p not in inside:
            out.setdefault(p, NOT_SUBMITTED)
    return out


def publish(
    signed: SignedManifest,
    agg: Aggregate,
    identity: NodeIdentity,
    now: datetime,
    excluded: Mapping[str, str],
    rejected: Mapping[str, str],
    takeover: bool = False,
) -> Published:
    """The result of `agg`, signed by `identity` (the coordinator, or a taker with
    `takeover=True`), listing `excluded` with their reasons."""
    listed = [Exclusion(participant=p, reason=r[:256]) for p, r in sorted(excluded.items())]
    result = build_result(signed, agg, identity.node_id, listed, takeover, now=now)
    return Published(
        doc=SignedDoc.sign(identity, result),
        adapter=agg.adapter,
        adapter_sha=sha256_hex(agg.adapter),
        observed=observations(agg, rejected),
        included=list(agg.included),
    )
