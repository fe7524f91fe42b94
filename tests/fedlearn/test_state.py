from hearthnet.errors import ErrorCode
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


def test_membership_stages_in_order(make_manifest):
    member = Membership(make_manifest())
    with raises_code(ErrorCode.BAD_REQUEST):
        member.apply("joined", {"receipt": {}})  # consent first
    member.apply("consent", {})
    assert member.stage is Stage.CONSENTED
    with raises_code(ErrorCode.BAD_REQUEST):
        member.apply("submitted", {})
    member.apply("aborted", {"code": "x", "reason": "y"})
    with raises_code(ErrorCode.BAD_REQUEST):
        member.apply("consent", {})


def test_steps_run_are_folded_from_the_events(make_manifest):
    from hearthnet.fedlearn.submission import ParticipantSubmission
    from hearthnet.identity import NodeIdentity

    signed = make_manifest()
    receipt = {"body": "{}", "signature": "00" * 64}
    trained = {"blob_sha": "ab" * 32, "num_samples": 4, "train_loss": 2.0}
    member = Membership(signed)
    for suffix, payload in [
        ("consent", {}),
        ("joined", {"receipt": receipt}),
        ("trained", trained | {"steps": 18, "train_steps": 30, "stopped_early": True}),
    ]:
        member.apply(suffix, payload)
    assert member.steps == 18
    older = Membership(signed)  # a log written before steps were recorded
    for suffix, payload in [
        ("consent", {}),
        ("joined", {"receipt": receipt}),
        ("trained", trained),
    ]:
        older.apply(suffix, payload)
    assert older.stage is Stage.TRAINED and older.steps is None

    ident = NodeIdentity.generate()
    record = RoundRecord(signed)
    for steps in (18, None):
        sub = ParticipantSubmission.create(ident, signed.round_id, b"d" * 8, 4, 2.0, steps=steps)
        record.submissions.clear()
        record.apply("submitted", {"submission": sub.model_dump(), "blob_sha": "cd" * 32})
        folded = record.submissions[ident.node_id].submission
        assert folded.steps == steps
        folded.verify(b"d" * 8)
