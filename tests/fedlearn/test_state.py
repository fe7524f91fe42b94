import pytest

from hearthnet.errors import HearthnetError
from hearthnet.fedlearn.state import Membership, Phase, RoundRecord, Stage


def test_round_transitions_follow_the_lifecycle(make_manifest):
    record = RoundRecord(make_manifest())
    for bad in ("aggregated", "completed", "unknown"):
        with pytest.raises(HearthnetError):
            record.apply(bad, {})
    record.apply("aggregating", {})
    assert record.phase is Phase.AGGREGATING
    with pytest.raises(HearthnetError):  # no joins once aggregating
        record.apply("joined", {"participant": "x", "receipt": {}})
    record.apply("aborted", {"code": "fedlearn_min_participants_unmet", "reason": "2 < 3"})
    assert record.phase is Phase.ABORTED
    for late in ("aggregating", "completed", "aborted", "submitted"):
        with pytest.raises(HearthnetError):
            record.check(late)
    record.apply("rejected", {"participant": "x", "code": "round_closed", "reason": "late"})
    assert record.rejected[-1]["code"] == "round_closed"


def test_membership_stages_in_order(make_manifest):
    member = Membership(make_manifest())
    with pytest.raises(HearthnetError):
        member.apply("joined", {"receipt": {}})  # consent first
    member.apply("consent", {})
    assert member.stage is Stage.CONSENTED
    with pytest.raises(HearthnetError):
        member.apply("submitted", {})
    member.apply("aborted", {"code": "x", "reason": "y"})
    with pytest.raises(HearthnetError):
        member.apply("consent", {})
