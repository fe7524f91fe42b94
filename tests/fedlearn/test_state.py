from hearthnet.errors import ErrorCode
from hearthnet.fedlearn import events as ev
from hearthnet.fedlearn.protocol import SignedDoc
from hearthnet.fedlearn.state import Membership, Phase, RoundRecord, Stage
from tests.helpers import raises_code


def test_round_transitions_follow_the_lifecycle(make_manifest):
    record = RoundRecord(make_manifest())
    for bad in ("aggregated", "completed", "unknown"):
        with raises_code(ErrorCode.BAD_REQUEST):
            record.apply(bad, {})
    record.apply("aggregating", {})
    assert record.phase is Phase.AGGREGATING
    with raises_code(ErrorCode.BAD_REQUEST):  # no joins once aggregating
        record.apply("joined", {"participant": "x", "receipt": {}})
    record.apply("aborted", {"code": "fedlearn_min_participants_unmet", "reason": "2 < 3"})
    assert record.phase is Phase.ABORTED
    for late in ("aggregating", "completed", "aborted", "submitted"):
        with raises_code(ErrorCode.BAD_REQUEST):
            record.check(late)
    record.apply("rejected", {"participant": "x", "code": "round_closed", "reason": "late"})
    assert record.rejected[-1]["code"] == "round_closed"


def _consent(round_id: str) -> ev.ConsentGranted:
    return ev.ConsentGranted(round_id=round_id, manifest_sha="ab" * 32, consent_text_sha="cd" * 32)


def test_membership_stages_in_order(make_manifest):
    member = Membership(make_manifest())
    rid = member.round_id
    receipt = SignedDoc(body="{}", signature="00" * 64)
    with raises_code(ErrorCode.BAD_REQUEST):
        member.apply("joined", ev.MemberJoined(round_id=rid, receipt=receipt))  # consent first
    member.apply("consent", _consent(rid))
    assert member.stage is Stage.CONSENTED
    with raises_code(ErrorCode.BAD_REQUEST):
        member.apply("submitted", ev.RoundOnly(round_id=rid))
    with raises_code(ErrorCode.BAD_REQUEST):  # the right step with the wrong payload model
        member.apply("joined", ev.RoundOnly(round_id=rid))
    member.apply("aborted", ev.Aborted(round_id=rid, code="x", reason="y"))
    with raises_code(ErrorCode.BAD_REQUEST):
        member.apply("consent", _consent(rid))


def test_steps_run_are_folded_from_the_events(make_manifest):
    from hearthnet.fedlearn.submission import ParticipantSubmission
    from hearthnet.identity import NodeIdentity

    signed = make_manifest()
    receipt = {"body": "{}", "signature": "00" * 64}
    trained = {"blob_sha": "ab" * 32, "num_samples": 4, "train_loss": 2.0}
    rid = signed.round_id
    member = Membership(signed)
    for suffix, payload in [
        ("consent", _consent(rid).body()),
        ("joined", {"round_id": rid, "receipt": receipt}),
        ("trained", {"round_id": rid, **trained, "steps": 18, "train_steps": 30}),
    ]:
        member.apply(suffix, ev.MEMBER_EVENTS[suffix].model_validate(payload))
    assert member.steps == 18
    older = Membership(signed)  # a log written before steps were recorded
    for suffix, payload in [
        ("consent", _consent(rid).body()),
        ("joined", {"round_id": rid, "receipt": receipt}),
        ("trained", {"round_id": rid, **trained}),
    ]:
        older.apply(suffix, ev.MEMBER_EVENTS[suffix].model_validate(payload))
    assert older.stage is Stage.TRAINED and older.steps is None

    ident = NodeIdentity.generate()
    record = RoundRecord(signed)
    for steps in (18, None):
        sub = ParticipantSubmission.create(ident, signed.round_id, b"d" * 8, 4, 2.0, steps=steps)
        record.submissions.clear()
        stored = {"participant": ident.node_id, "submission": sub.model_dump()}
        record.apply("submitted", stored | {"blob_sha": "cd" * 32})  # as the log stores it
        folded = record.submissions[ident.node_id].submission
        assert folded.steps == steps
        folded.verify(b"d" * 8)
