"""The taker machine without a cluster: when a takeover is due, what a member hands over, what
the taker checks, and that the shared finalize gives the coordinator's adapter SHA."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from hearthnet import constants as C
from hearthnet.blobs import BlobStore
from hearthnet.errors import ErrorCode
from hearthnet.fedlearn.machines import effects as fx
from hearthnet.fedlearn.machines import finalize
from hearthnet.fedlearn.machines.taker import (
    GRACE,
    HANDOVER,
    RESULT,
    TURN,
    TakerMachine,
    check_handed,
    preference,
)
from hearthnet.fedlearn.protocol import JoinReceipt, RoundResult, SignedDoc
from hearthnet.fedlearn.state import Membership, Stage
from hearthnet.identity import NodeIdentity
from tests.fedlearn.conftest import MODEL_SHAPES
from tests.fedlearn.machines.harness import (
    ROUND_ID,
    CoordinatorHarness,
    MemoryLog,
    aggregate,
    node_config,
    submission,
)
from tests.helpers import raises_code

LIMIT = C.FEDLEARN_SUBMISSION_MAX_BYTES


class Round:
    """A round its coordinator ran up to three submissions (and, if asked, finalized), and each
    participant's `Membership` of it as its own log would have folded it."""

    def __init__(self, tmp_path: Path, finalized: bool):
        self.coord_id = NodeIdentity.generate()
        self.ids = [NodeIdentity.generate() for _ in range(3)]
        self.config = node_config(tmp_path)
        self.coord = CoordinatorHarness(
            self.coord_id, self.config, BlobStore(tmp_path / "coord"), MemoryLog(self.coord_id)
        )
        self.signed = self.coord.announce()
        self.members: dict[str, Membership] = {}
        self.blobs: dict[str, BlobStore] = {}
        self.data: dict[str, bytes] = {}
        for i, p in enumerate(self.ids):
            receipt = self.coord.enroll(p)
            sub, data = submission(p, self.signed, seed=i)
            self.coord.submit(p, sub, receipt, data)
            store = self.blobs[p.node_id] = BlobStore(tmp_path / p.node_id[:8])
            member = Membership(self.signed, stage=Stage.SUBMITTED, receipt=receipt)
            member.submission, member.submitted_sha = sub, store.put(data)
            member.participants = {q.node_id for q in self.ids}
            self.members[p.node_id] = member
            self.data[p.node_id] = data
        self.doc = self.coord.finalize() if finalized else None
        self.deadline = self.signed.manifest.deadline_at
        self.after = self.deadline + timedelta(seconds=60)

    def machine(self, i: int) -> TakerMachine:
        return TakerMachine(self.ids[i], self.config)

    def member(self, i: int) -> Membership:
        return self.members[self.ids[i].node_id]


@pytest.fixture
def rnd(tmp_path: Path) -> Round:
    return Round(tmp_path, finalized=False)


def test_the_takeover_waits_for_its_turn_and_for_the_coordinator_to_be_gone(rnd: Round):
    order = preference(ROUND_ID, set(rnd.members))
    second = next(i for i, p in enumerate(rnd.ids) if p.node_id == order[1])
    machine, member = rnd.machine(second), rnd.member(second)
    [grace] = machine.watch(member)
    assert grace == fx.SetTimer(
        GRACE + ROUND_ID, rnd.deadline + timedelta(seconds=C.FEDLEARN_TAKEOVER_GRACE_S)
    )
    [turn] = machine.timer(grace.name, member, grace.at, coordinator_up=False)
    assert isinstance(turn, fx.SetTimer) and turn.name == TURN + ROUND_ID
    assert turn.at == grace.at + timedelta(seconds=C.FEDLEARN_TAKEOVER_STAGGER_S)  # slot 1
    # the coordinator is back (or has published): look again a stagger later, no takeover
    [again] = machine.timer(turn.name, member, turn.at, coordinator_up=True)
    assert isinstance(again, fx.SetTimer) and again.at > turn.at
    member.coordinator_phase = "completed"
    assert isinstance(machine.timer(turn.name, member, turn.at, False)[0], fx.SetTimer)
    member.coordinator_phase = "aggregating"
    assert machine.timer(turn.name, member, turn.at, False) == [fx.Finalize(ROUND_ID)]
    member.stage = Stage.COMPLETED
    assert machine.timer(turn.name, member, turn.at, False) == []
    # the coordinator itself never watches its own round
    own = TakerMachine(rnd.coord_id, rnd.config)
    assert own.watch(Membership(rnd.signed)) == []


def test_a_takeover_result_counts_only_in_its_turn(rnd: Round):
    order = preference(ROUND_ID, set(rnd.members))
    i_last = next(i for i, p in enumerate(rnd.ids) if p.node_id == order[-1])
    first = next(p for p in rnd.ids if p.node_id == order[0])
    machine, member = rnd.machine(i_last), rnd.member(i_last)

    def claimed(by: NodeIdentity, takeover: bool = True) -> RoundResult:
        return RoundResult.model_construct(aggregator=by.node_id, takeover=takeover)

    slot0 = C.FEDLEARN_TAKEOVER_GRACE_S - C.FEDLEARN_CLOCK_SKEW_S
    early = rnd.deadline + timedelta(seconds=slot0 - 0.5)
    on_time = rnd.deadline + timedelta(seconds=slot0)
    assert not machine.takeover_turn(member, claimed(first), early, False)
    assert machine.takeover_turn(member, claimed(first), on_time, False)
    assert not machine.takeover_turn(member, claimed(first), on_time, True)  # coordinator up
    assert not machine.takeover_turn(member, claimed(first, takeover=False), on_time, False)
    outsider = NodeIdentity.generate()
    assert not machine.takeover_turn(member, claimed(outsider), on_time, False)
    assert machine.takeover_turn(member, claimed(rnd.ids[i_last]), early, True)  # its own


def test_takeover_refusals_and_a_coordinator_back_during_the_takeover(rnd: Round):
    machine, member = rnd.machine(0), rnd.member(0)
    with raises_code(ErrorCode.BAD_REQUEST, "waits for the deadline"):
        machine.begin(member, rnd.deadline - timedelta(seconds=1), False)
    with raises_code(ErrorCode.FORBIDDEN, "coordinator is reachable"):
        machine.begin(member, rnd.after, True)
    with raises_code(ErrorCode.FORBIDDEN, "only a participant"):
        machine.begin(Membership(rnd.signed), rnd.after, False)
    done, g, calls = machine.begin(member, rnd.after, False)
    assert done is None and g is not None and set(g.submissions) == {rnd.ids[0].node_id}
    assert sorted(c.peer for c in calls if isinstance(c, fx.Call)) == sorted(
        p.node_id for p in rnd.ids[1:]
    )
    assert all(isinstance(c, fx.Call) and c.capability == HANDOVER for c in calls)
    # meanwhile the coordinator came back: the others refuse to hand over, the takeover is
    # left with one submission of the three it needs, and aborts without a result
    for i in (1, 2):
        with raises_code(ErrorCode.FORBIDDEN, "only in a takeover") as info:
            rnd.machine(i).handover(
                rnd.member(i), rnd.ids[0].node_id, member.receipt, rnd.after, True
            )
        machine.refused(g, rnd.ids[i].node_id, info.value)
    step = machine.plan(member, g)
    assert isinstance(step, finalize.Abort)
    assert step.code is ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET
    assert "takeover gathered 1 submissions" in step.reason
    assert set(g.excluded) == {p.node_id for p in rnd.ids[1:]}
    assert all(r.startswith("forbidden: ") for r in g.excluded.values())


def test_handed_submissions_are_checked(rnd: Round):
    taker, giver = rnd.member(0), rnd.member(1)
    peer = rnd.ids[1].node_id
    before = rnd.deadline - timedelta(seconds=1)
    with raises_code(ErrorCode.FORBIDDEN, "only in a takeover"):
        rnd.machine(1).handover(giver, rnd.ids[0].node_id, taker.receipt, before, False)
    with raises_code(ErrorCode.FORBIDDEN, "no valid join receipt"):  # someone else's receipt
        rnd.machine(1).handover(giver, rnd.ids[2].node_id, taker.receipt, rnd.after, False)
    resp, sha = rnd.machine(1).handover(giver, rnd.ids[0].node_id, taker.receipt, rnd.after, False)
    data = rnd.blobs[peer].get(sha)
    check_handed(taker, resp, data, peer, MODEL_SHAPES, LIMIT)  # the honest one passes
    with raises_code(ErrorCode.FORBIDDEN, "not the peer's"):  # passed off as another's
        check_handed(taker, resp, data, rnd.ids[2].node_id, MODEL_SHAPES, LIMIT)
    with raises_code(ErrorCode.DELTA_INVALID):  # bytes other than the signed ones
        check_handed(taker, resp, rnd.data[rnd.ids[2].node_id], peer, MODEL_SHAPES, LIMIT)
    forged = resp.model_copy(
        update={"receipt": SignedDoc.sign(rnd.ids[1], resp.receipt.claimed(JoinReceipt))}
    )
    with raises_code(ErrorCode.SIGNATURE_INVALID):  # a receipt not signed by the coordinator
        check_handed(taker, forged, data, peer, MODEL_SHAPES, LIMIT)


def test_the_takeover_finalize_gives_the_coordinators_adapter_sha(tmp_path: Path):
    rnd = Round(tmp_path, finalized=True)
    assert rnd.doc is not None
    theirs = rnd.doc.open(RoundResult, rnd.coord_id.node_id)
    machine, member = rnd.machine(0), rnd.member(0)
    store = rnd.blobs[rnd.ids[0].node_id]
    _, g, calls = machine.begin(member, rnd.after, False)
    assert g is not None
    for call in calls:
        assert isinstance(call, fx.Call)
        i = next(n for n, p in enumerate(rnd.ids) if p.node_id == call.peer)
        resp, sha = rnd.machine(i).handover(
            rnd.member(i), rnd.ids[0].node_id, member.receipt, rnd.after, False
        )
        data = rnd.blobs[call.peer].get(sha)
        check_handed(member, resp, data, call.peer, MODEL_SHAPES, LIMIT)
        machine.handed(g, member, call.peer, resp, store.put(data))
    assert set(member.handed) == {p.node_id for p in rnd.ids[1:]}  # kept for recomputation
    step = machine.plan(member, g)
    assert isinstance(step, fx.Aggregate)
    doc, effects = machine.publish(member, g, aggregate(store, step), rnd.after)
    ours = doc.open(RoundResult, rnd.ids[0].node_id)
    assert ours.takeover and ours.aggregator == rnd.ids[0].node_id
    assert ours.aggregated_delta_sha == theirs.aggregated_delta_sha
    assert ours.included == theirs.included and ours.excluded == []
    pushes = [e for e in effects if isinstance(e, fx.Call)]
    assert sorted(e.peer for e in pushes) == sorted(p.node_id for p in rnd.ids[1:])
    assert all(e.capability == RESULT for e in pushes)
    assert isinstance(effects[0], fx.StoreBlob) and isinstance(effects[1], fx.RecordReputation)
    # a result already held is the answer to a second takeover
    member.result = doc
    assert machine.begin(member, rnd.after, False)[0] == doc
