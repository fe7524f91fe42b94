"""What `round.list`, `round.pending` and `round.status` show: read-only views of this node's
rounds (`state.RoundRecord`, coordinated here) and memberships (`state.Membership`, offered here).

Pure: no I/O; the service passes in the current state.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.budget import Ledger, PrivacyPolicy, after_join, check_join, round_epsilon
from hearthnet.fedlearn.budget import wire_epsilon as wire
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.protocol import (
    PrivacyOffer,
    PrivacyResponse,
    PrivacyTopic,
    RoundStatus,
    RoundSummary,
)
from hearthnet.fedlearn.state import (
    TERMINAL_PHASES,
    TERMINAL_STAGES,
    Membership,
    Phase,
    RoundRecord,
    Stage,
)

Rounds = Mapping[str, RoundRecord]
Members = Mapping[str, Membership]


def summary(signed: SignedManifest, phase: str, role: str) -> RoundSummary:
    """One round as a list shows it, with its full manifest."""
    m = signed.manifest
    return RoundSummary(
        round_id=m.round_id,
        topic=m.topic,
        coordinator=m.coordinator,
        deadline=m.deadline,
        phase=phase,
        role=role,
        manifest=m.to_json() | {"manifest_sha": signed.manifest_sha},
    )


def summaries(
    rounds: Rounds, members: Members, topic: str | None, local: bool
) -> list[RoundSummary]:
    """The operator (`local`) sees every round known here; a peer only the open rounds
    coordinated here. Sorted by round ID; the coordinator's view wins over the member's."""
    out: dict[str, RoundSummary] = {}
    if local:
        for rid, member in members.items():
            out[rid] = summary(member.signed, member.coordinator_phase, "participant")
    for rid, record in rounds.items():
        if local or record.phase is Phase.ANNOUNCED:
            out[rid] = summary(record.signed, str(record.phase), "coordinator")
    return [s for _, s in sorted(out.items()) if topic is None or s.topic == topic]


def pending(members: Members, now: datetime | None = None) -> list[RoundSummary]:
    """Rounds offered here that await the operator's consent and have not passed their deadline."""
    now = now or datetime.now(UTC)
    waiting = [
        summary(m.signed, m.coordinator_phase, "participant")
        for m in members.values()
        if m.stage is Stage.OFFERED and m.signed.manifest.deadline_at > now
    ]
    return sorted(waiting, key=lambda s: s.round_id)


def privacy(members: Members, ledger: Ledger, policy: PrivacyPolicy) -> PrivacyResponse:
    """The ledger per topic and, for each offer not yet joined, what joining would spend."""
    delta = policy.delta
    topics = [
        PrivacyTopic(topic=t.topic, rounds=list(t.rounds), epsilon=wire(t.epsilon(delta)))
        for t in ledger.values()
    ]
    offers = []
    for rid, member in sorted(members.items()):
        if member.stage not in (Stage.OFFERED, Stage.CONSENTED):
            continue
        m = member.signed.manifest
        refusal = None
        try:
            check_join(ledger, m, delta, policy.budget, policy.require_dp)
        except HearthnetError as err:
            refusal = err.message
        offers.append(
            PrivacyOffer(
                round_id=rid,
                topic=m.topic,
                epsilon=wire(round_epsilon(m, delta)),
                topic_epsilon_after=wire(after_join(ledger, m, delta)),
                refusal=refusal,
            )
        )
    return PrivacyResponse(
        delta=delta,
        budget=policy.budget,
        require_dp=policy.require_dp,
        topics=topics,
        offers=offers,
    )


def status(node_id: str, rounds: Rounds, members: Members, round_id: str) -> RoundStatus:
    """A round's state as this node knows it: the coordinator's record if it coordinates the
    round, else its own membership; `bad_request` if it knows neither."""
    record = rounds.get(round_id)
    member = members.get(round_id)
    if record is not None:
        return RoundStatus(
            round_id=round_id,
            phase=str(record.phase),
            role="coordinator",
            stage=str(member.stage) if member else None,
            coordinator=node_id,
            deadline=record.signed.manifest.deadline,
            joined=sorted(record.joined),
            submitted=sorted(record.submissions),
            rejected=record.rejected,
            result=record.result,
            abort=record.abort,
            train_steps=record.signed.manifest.train_steps,
            steps={p: s.submission.steps for p, s in sorted(record.submissions.items())},
        )
    if member is None:
        raise HearthnetError(ErrorCode.BAD_REQUEST, f"round {round_id} is unknown here")
    phase = {Stage.COMPLETED: "completed", Stage.ABORTED: "aborted"}.get(
        member.stage, member.coordinator_phase
    )
    return RoundStatus(
        round_id=round_id,
        phase=phase,
        role="participant",
        stage=str(member.stage),
        coordinator=member.signed.manifest.coordinator,
        deadline=member.signed.manifest.deadline,
        joined=sorted(member.participants),
        submitted=[],
        rejected=[],
        result=member.result,
        abort=member.abort,
        train_steps=member.signed.manifest.train_steps,
        steps={} if member.steps is None else {node_id: member.steps},
    )


def finished(rounds: Rounds, members: Members, round_id: str) -> bool:
    """Has the round ended here (what `round.status --wait` waits for)? A member's terminal
    stage, or the coordinator's terminal phase when this node never joined."""
    record = rounds.get(round_id)
    member = members.get(round_id)
    if member is not None and member.stage in TERMINAL_STAGES:
        return True
    return (
        record is not None
        and record.phase in TERMINAL_PHASES
        and (member is None or member.stage in (Stage.OFFERED, Stage.CONSENTED))
    )
