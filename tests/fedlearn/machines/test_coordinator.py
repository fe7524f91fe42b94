"""The coordinator machine without a cluster: inputs in, effects out (`harness.py` carries the
effects out as `drivers/coordinator.py` does, with a real blob store and real aggregation)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from hearthnet import constants as C
from hearthnet.blobs import BlobStore
from hearthnet.canonical import sha256_hex
from hearthnet.errors import ErrorCode
from hearthnet.fedlearn.aggregation.secure import mask_delta, serialize_masked
from hearthnet.fedlearn.machines import effects as fx
from hearthnet.fedlearn.machines.coordinator import DEADLINE, ROSTER
from hearthnet.fedlearn.masks import MaskingKey
from hearthnet.fedlearn.protocol import RoundResult
from hearthnet.fedlearn.secagg import confirm_bytes, make_bundle, reveal
from hearthnet.fedlearn.state import Phase
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.identity import NodeIdentity
from tests.fedlearn.conftest import MODEL_SHAPES, random_delta
from tests.fedlearn.machines.harness import (
    ROUND_ID,
    T0,
    CoordinatorHarness,
    MemoryLog,
    draft,
    node_config,
    submission,
)
from tests.helpers import raises_code


@pytest.fixture
def ids() -> list[NodeIdentity]:
    return [NodeIdentity.generate() for _ in range(4)]


@pytest.fixture
def harness(tmp_path: Path) -> CoordinatorHarness:
    me = NodeIdentity.generate()
    return CoordinatorHarness(
        me, node_config(tmp_path), BlobStore(tmp_path / "blobs"), MemoryLog(me)
    )


def test_announce_join_submit_finalize(harness: CoordinatorHarness, ids: list[NodeIdentity]):
    signed = harness.announce()
    assert harness.log.types() == ["announced"]
    assert harness.timers == {DEADLINE + ROUND_ID: signed.manifest.deadline_at}
    receipts = [harness.enroll(p) for p in ids[:3]]
    assert harness.enroll(ids[0]) == receipts[0]  # a second join gets the same receipt
    assert harness.log.types().count("joined") == 3
    for i, (p, receipt) in enumerate(zip(ids[:3], receipts, strict=True)):
        assert not harness.finalize_asked  # not all in yet
        sub, data = submission(p, signed, seed=i)
        answer = harness.submit(p, sub, receipt, data)
        assert answer.delta_sha == sub.delta_sha and harness.blobs.has(sub.delta_sha)
    assert harness.finalize_asked == [ROUND_ID]  # every joined participant submitted
    doc = harness.finalize()
    assert harness.log.types()[-3:] == ["aggregating", "aggregated", "completed"]
    result = doc.open(RoundResult, harness.machine.node_id)
    assert result.included == sorted(p.node_id for p in ids[:3]) and not result.takeover
    record = harness.machine.get(ROUND_ID)
    assert record.phase is Phase.COMPLETED and record.adapter_sha == result.aggregated_delta_sha
    assert sha256_hex(harness.blobs.get(result.aggregated_delta_sha)) == record.adapter_sha
    assert [r.round_id for r in harness.reputation] == [ROUND_ID]
    assert harness.finalize() == doc  # finalizing again answers the stored result
    assert harness.machine.timer(DEADLINE + ROUND_ID, signed.manifest.deadline_at) == []


def test_too_few_submissions_abort_at_the_deadline(
    harness: CoordinatorHarness, ids: list[NodeIdentity]
):
    signed = harness.announce()
    receipts = [harness.enroll(p) for p in ids[:3]]
    for i in range(2):
        sub, data = submission(ids[i], signed, seed=i)
        harness.submit(ids[i], sub, receipts[i], data)
    assert not harness.finalize_asked
    deadline = harness.timers[DEADLINE + ROUND_ID]
    assert harness.machine.timer(DEADLINE + ROUND_ID, deadline) == [fx.Finalize(ROUND_ID)]
    with raises_code(ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET, "2 valid submissions"):
        harness.finalize(deadline)
    assert harness.log.types()[-2:] == ["aggregating", "aborted"]
    with raises_code(ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET):  # the stored abort
        harness.finalize(deadline)
    with raises_code(ErrorCode.ROUND_CLOSED):
        harness.enroll(ids[3], deadline)


def test_duplicate_and_late_submissions_are_refused_and_recorded(
    harness: CoordinatorHarness, ids: list[NodeIdentity]
):
    signed = harness.announce()
    receipts = [harness.enroll(p) for p in ids[:3]]
    sub, data = submission(ids[0], signed, seed=0)
    harness.submit(ids[0], sub, receipts[0], data)
    with raises_code(ErrorCode.DELTA_INVALID, "already submitted"):
        harness.submit(ids[0], sub, receipts[0], data)
    late = signed.manifest.deadline_at + timedelta(seconds=1)
    sub1, data1 = submission(ids[1], signed, seed=1)
    with raises_code(ErrorCode.ROUND_CLOSED, "after the deadline"):
        harness.submit(ids[1], sub1, receipts[1], data1, late)
    with raises_code(ErrorCode.FORBIDDEN):  # someone else's receipt
        harness.submit(ids[2], *_swap(submission(ids[2], signed, 2), receipts[1]))
    rejected = harness.machine.get(ROUND_ID).rejected
    assert [(r["participant"], r["code"]) for r in rejected] == [
        (ids[0].node_id, "delta_invalid"),
        (ids[1].node_id, "round_closed"),
        (ids[2].node_id, "forbidden"),
    ]
    assert list(harness.machine.get(ROUND_ID).submissions) == [ids[0].node_id]


def _swap(made, receipt):  # (sub, data), receipt -> sub, receipt, data
    sub, data = made
    return sub, receipt, data


def test_secure_roster_closes_on_its_timer_or_when_full(
    harness: CoordinatorHarness, ids: list[NodeIdentity]
):
    signed = harness.announce(secure=True, clip_norm=1.0, max_participants=4)
    roster_at = harness.timers[ROSTER + ROUND_ID]
    m = signed.manifest
    expected = (
        m.created_at_dt + (m.deadline_at - m.created_at_dt) * C.FEDLEARN_SECURE_ROSTER_FRACTION
    )
    assert roster_at == expected
    for p in ids[:3]:
        harness.enroll(p)
        ann = MaskingKey().announce(p, ROUND_ID, signed.manifest_sha, 4)
        harness.run(harness.machine.accept_mask_key(p.node_id, ann))
        harness.run(harness.machine.accept_mask_key(p.node_id, ann))  # repeated: no-op
    assert harness.machine.get(ROUND_ID).roster is None  # 3 of 4 places: waits for the timer
    harness.run(harness.machine.timer(ROSTER + ROUND_ID, roster_at))
    assert harness.machine.get(ROUND_ID).roster == sorted(p.node_id for p in ids[:3])
    with raises_code(ErrorCode.ROUND_CLOSED, "mask roster is closed"):
        harness.enroll(ids[3])


def test_secure_roster_closes_at_once_when_every_place_is_taken(
    harness: CoordinatorHarness, ids: list[NodeIdentity]
):
    signed = harness.announce(secure=True, clip_norm=1.0, max_participants=3)
    for p in ids[:3]:
        harness.enroll(p)
        ann = MaskingKey().announce(p, ROUND_ID, signed.manifest_sha, 4)
        harness.run(harness.machine.accept_mask_key(p.node_id, ann))
    assert harness.log.types()[-1] == "roster"
    late = MaskingKey().announce(ids[0], ROUND_ID, signed.manifest_sha, 4)
    with raises_code(ErrorCode.BAD_REQUEST, "already announced"):
        harness.machine.accept_mask_key(ids[0].node_id, late)


def test_announce_refusals(harness: CoordinatorHarness, tmp_path: Path):
    with raises_code(ErrorCode.BASE_MODEL_MISMATCH, "own base model"):
        harness.machine.announce(draft(), "cd" * 32, T0, ROUND_ID)
    strict = CoordinatorHarness(
        harness.log.identity,
        node_config(tmp_path, require_secure_aggregation=True),
        harness.blobs,
        MemoryLog(harness.log.identity),
    )
    with raises_code(ErrorCode.MANIFEST_INVALID, "require_secure_aggregation"):
        strict.announce()


def _full_round(h: CoordinatorHarness, ids: list[NodeIdentity], upto: int, restart) -> bytes:
    """Announce, three joins, three submissions, finalize: restarting (fold the log into a fresh
    machine) before step `upto`; returns the signed result's bytes."""
    signed = None
    receipts = {}
    steps = ["announce", *(f"join{i}" for i in range(3)), *(f"sub{i}" for i in range(3)), "fin"]
    for n, step in enumerate(steps):
        if n == upto:
            h = restart(h)
        if step == "announce":
            signed = h.announce()
        elif step.startswith("join"):
            i = int(step[-1])
            receipts[i] = h.enroll(ids[i])
        elif step.startswith("sub"):
            i = int(step[-1])
            assert signed is not None
            sub, data = submission(ids[i], signed, seed=i)
            h.submit(ids[i], sub, receipts[i], data)
        else:
            doc = h.finalize()
    return doc.body.encode()


def test_restart_at_every_step_gives_the_same_result_bytes(tmp_path: Path, ids: list[NodeIdentity]):
    me = NodeIdentity.generate()
    config = node_config(tmp_path)

    def fresh(name: str) -> CoordinatorHarness:
        return CoordinatorHarness(me, config, BlobStore(tmp_path / name), MemoryLog(me))

    straight = _full_round(fresh("straight"), ids, upto=-1, restart=None)
    for upto in range(1, 8):
        again = _full_round(fresh(f"r{upto}"), ids, upto, CoordinatorHarness.restored)
        assert again == straight, f"restart before step {upto}"


@pytest.mark.parametrize("crash_after", ["aggregating", "aggregated"])
def test_a_crash_inside_finalize_refinalizes_to_the_same_bytes(
    harness: CoordinatorHarness, ids: list[NodeIdentity], crash_after: str
):
    straight = _full_round(harness, ids, upto=-1, restart=None)
    cut = harness.log.types().index(crash_after) + 1
    back = CoordinatorHarness.restored(harness, upto=cut)
    assert back.finalize_asked == [ROUND_ID]  # a round caught aggregating is finalized again
    assert back.machine.get(ROUND_ID).phase is Phase.AGGREGATING
    assert back.finalize().body.encode() == straight


def _masked(signed, who: NodeIdentity, key: MaskingKey, plan, shared, seed: int, samples: int):
    vec = mask_delta(
        random_delta(signed, seed), key, who.node_id, plan, shared, signed.manifest, MODEL_SHAPES
    )
    data = serialize_masked(
        vec, manifest_sha=signed.manifest_sha, round_id=ROUND_ID, participant=who.node_id
    )
    sub = ParticipantSubmission.create(who, ROUND_ID, data, samples, 1.5, steps=10)
    return sub, data


def test_secure_round_unmasks_survivors_after_a_drop_and_a_restart(
    harness: CoordinatorHarness, ids: list[NodeIdentity]
):
    """Keys, shares, three of four masked submissions, the deadline: the unmask request names
    the fourth as dropped; the reveals recover the secrets (again after a restart, which
    repeats the same request) and the result is the three survivors' mean."""
    signed = harness.announce(secure=True, clip_norm=1.0, max_participants=4)
    members = ids[:4]
    keys = {p.node_id: MaskingKey() for p in members}
    receipts = {}
    for p in members:
        receipts[p.node_id] = harness.enroll(p)
        ann = keys[p.node_id].announce(p, ROUND_ID, signed.manifest_sha, 4)
        harness.run(harness.machine.accept_mask_key(p.node_id, ann))
    record = harness.machine.get(ROUND_ID)
    plan = harness.machine.secure.secagg_plan(record)
    with raises_code(ErrorCode.FORBIDDEN):  # a bundle is its sender's own
        harness.machine.accept_shares(
            members[1].node_id, make_bundle(members[0], keys[members[0].node_id], plan)
        )
    bundles = {p.node_id: make_bundle(p, keys[p.node_id], plan) for p in members}
    for p in members:
        harness.run(harness.machine.accept_shares(p.node_id, bundles[p.node_id]))
        harness.run(harness.machine.accept_shares(p.node_id, bundles[p.node_id]))  # no-op
    assert harness.log.types()[-1] == "shares_closed"
    shared = sorted(bundles)
    survivors = members[:3]
    for i, p in enumerate(survivors):
        sub, data = _masked(signed, p, keys[p.node_id], plan, shared, i, 4)
        harness.submit(p, sub, receipts[p.node_id], data)
    harness.run(harness.machine.timer(DEADLINE + ROUND_ID, signed.manifest.deadline_at))
    done, effects = harness.machine.close(ROUND_ID)
    harness.run(effects)
    assert done is None and harness.log.types()[-1] == "unmask"
    req = harness.machine.get(ROUND_ID).unmask
    assert req is not None and req.dropped == [members[3].node_id]
    assert harness.machine.unmasking(ROUND_ID)
    restored = CoordinatorHarness.restored(harness)  # reveals lived in memory only
    assert restored.finalize_asked == [ROUND_ID] and restored.machine.unmasking(ROUND_ID)
    _, again = restored.machine.close(ROUND_ID)
    restored.run(again)
    assert restored.log.types()[-1] == "unmask"
    assert restored.log.events[-1].payload == harness.log.events[-1].payload  # the same request
    for i, p in enumerate(survivors):
        sig = p.sign(confirm_bytes(ROUND_ID, req.sha)).hex()
        with raises_code(ErrorCode.SIGNATURE_INVALID):  # another member's signature
            restored.machine.accept_confirm(survivors[i - 1].node_id, ROUND_ID, req.sha, sig)
        restored.run(restored.machine.accept_confirm(p.node_id, ROUND_ID, req.sha, sig))
    assert restored.log.types()[-1] == "confirmed"  # every survivor signed the same request
    with raises_code(ErrorCode.FORBIDDEN):  # the dropped member is not asked
        restored.machine.accept_confirm(members[3].node_id, ROUND_ID, req.sha, "00" * 64)
    for p in survivors:
        sigs = {q.node_id: q.sign(confirm_bytes(ROUND_ID, req.sha)).hex() for q in survivors}
        rev = reveal(p.node_id, keys[p.node_id], plan, bundles, req, sigs)
        restored.machine.accept_reveal(p.node_id, rev)
        with raises_code(ErrorCode.BAD_REQUEST):  # one answer per member
            restored.machine.accept_reveal(
                p.node_id, rev.model_copy(update={"key_shares": {}, "self_shares": {}})
            )
    assert not restored.machine.unmasking(ROUND_ID)
    doc = restored.finalize()
    result = doc.open(RoundResult, restored.machine.node_id)
    assert result.secure and result.n_participants == 3
    assert [e.participant for e in result.excluded] == [members[3].node_id]
