"""Checking a round's result against the signed submissions a participant holds (issue 13).

Pure: no I/O. A valid signature only says who made a result, not that it is the aggregate of
the round's submissions. A participant can always check its own entry (what it signed went in
unchanged, or it is excluded by name); a node that holds every submission a result lists (its
own takeover gathered them, or it coordinates the round) recomputes the aggregate and compares
SHAs (docs/decisions.md, "Hostile peers").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.protocol import RoundResult
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.identity import NodeID, verify


def check_listing(
    result: RoundResult,
    me: str,
    mine: ParticipantSubmission | None,
    participants: Collection[str],
) -> None:
    """The result's list of submissions is consistent — one entry per included participant, in
    order, no duplicates, samples adding up, every one a participant this node knows joined
    (`participants`) — and this node's own submission (`mine`, accepted by the coordinator
    before the deadline) is in it exactly as signed, or the result excludes this node by name.
    A result that could dodge recomputation by listing nothing, or a phantom participant nobody
    holds, is refused like any other inconsistency: `signature_invalid`."""
    listed = [ref.participant for ref in result.submissions]
    if (
        listed != list(result.included)
        or len(set(listed)) != len(listed)
        or sum(ref.num_samples for ref in result.submissions) != result.total_samples
        or {e.participant for e in result.excluded} & set(listed)
    ):
        raise HearthnetError(
            ErrorCode.SIGNATURE_INVALID, "result's submissions do not match its included list"
        )
    strangers = sorted(set(listed) - set(participants) - {me})
    if strangers:
        raise HearthnetError(
            ErrorCode.SIGNATURE_INVALID,
            f"result includes {strangers[0][:16]}…, which this node never saw join the round",
            {"strangers": strangers},
        )
    for entry in result.submissions:  # every entry is what its participant signed
        signed = ParticipantSubmission.signing_bytes(
            result.round_id,
            entry.participant,
            entry.delta_sha,
            entry.num_samples,
            entry.steps,
            entry.clip_bit,
        )
        if not verify(NodeID(entry.participant), signed, bytes.fromhex(entry.signature)):
            raise HearthnetError(
                ErrorCode.SIGNATURE_INVALID,
                f"result lists a submission of {entry.participant[:16]}… that it never signed",
            )
    if mine is None:
        return
    if me in result.included:
        ref = next((r for r in result.submissions if r.participant == me), None)
        if ref is None:
            raise HearthnetError(
                ErrorCode.SIGNATURE_INVALID, "result includes this node but does not list its delta"
            )
        if ref.delta_sha != mine.delta_sha or ref.num_samples != mine.num_samples:
            raise HearthnetError(
                ErrorCode.SIGNATURE_INVALID,
                "result lists this node's submission with another delta SHA or num_samples "
                "than it signed",
            )
    elif me not in {e.participant for e in result.excluded}:
        raise HearthnetError(
            ErrorCode.SIGNATURE_INVALID,
            "result leaves out this node's submission without an exclusion naming it",
        )


def held_for_recompute(
    result: RoundResult, held: Mapping[str, ParticipantSubmission]
) -> tuple[dict[str, ParticipantSubmission], list[str]]:
    """The held submissions to recompute `result` with, and the listed participants whose exact
    signed submission (same delta SHA and num_samples) this node lacks. Recompute only when the
    second is empty (and the result lists its submissions at all)."""
    use: dict[str, ParticipantSubmission] = {}
    missing: list[str] = []
    for ref in result.submissions:
        sub = held.get(ref.participant)
        if sub is None:
            missing.append(ref.participant)
        elif (sub.delta_sha, sub.num_samples, sub.steps) != (
            ref.delta_sha,
            ref.num_samples,
            ref.steps,
        ):
            # Both signed by the participant (check_listing verified the entry): it signed two
            # submissions for one round, or the aggregator found another; either way this node
            # cannot tell which went in, and a forged aggregate would hide behind the choice.
            raise HearthnetError(
                ErrorCode.SIGNATURE_INVALID,
                f"result lists a submission of {ref.participant[:16]}… other than the one this "
                "node holds signed by it",
            )
        else:
            use[ref.participant] = sub
    return use, missing


def check_recomputed(result: RoundResult, recomputed_sha: str) -> None:
    """The adapter this node aggregated from the same signed submissions is the result's."""
    if recomputed_sha != result.aggregated_delta_sha:
        raise HearthnetError(
            ErrorCode.FEDLEARN_AGGREGATION_FAILED,
            "result's adapter is not the aggregate of the submissions it lists (recomputed "
            f"{recomputed_sha[:16]}…, result names {result.aggregated_delta_sha[:16]}…)",
        )
