"""Checking a round's result against the signed submissions a node holds (issue 13)."""

import torch

from hearthnet.canonical import sha256_hex
from hearthnet.errors import ErrorCode
from hearthnet.fedlearn.aggregation.run import aggregate_submissions
from hearthnet.fedlearn.delta import serialize_delta
from hearthnet.fedlearn.protocol import Exclusion, SubmissionRef
from hearthnet.fedlearn.publish import adapter_bytes, build_result
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.fedlearn.verify import check_listing, check_recomputed, held_for_recompute
from hearthnet.identity import NodeIdentity
from tests.helpers import raises_code

from .conftest import MODEL_SHAPES, random_delta


def _round(tmp_path, make_manifest, n=3):
    signed = make_manifest()
    people = [NodeIdentity.generate() for _ in range(n)]
    subs, paths = {}, {}
    for i, ident in enumerate(people):
        data = serialize_delta(
            random_delta(signed, i),
            manifest_sha=signed.manifest_sha,
            round_id=signed.round_id,
            participant=ident.node_id,
        )
        sub = ParticipantSubmission.create(ident, signed.round_id, data, 10 + i, 0.1)
        (tmp_path / sub.delta_sha).write_bytes(data)
        subs[ident.node_id], paths[sub.delta_sha] = sub, tmp_path / sub.delta_sha
    agg = aggregate_submissions(signed, subs, paths.__getitem__, MODEL_SHAPES)
    result = build_result(signed, agg, people[0].node_id, [], takeover=True)
    return signed, people, subs, paths, agg, result


def test_a_result_lists_what_went_in_and_recomputes_to_its_sha(tmp_path, make_manifest):
    signed, people, subs, paths, _, result = _round(tmp_path, make_manifest)
    assert [r.participant for r in result.submissions] == result.included == sorted(subs)
    for ident in people:  # every participant finds its own signed submission, unchanged
        check_listing(result, ident.node_id, subs[ident.node_id], set(subs))
    check_listing(result, "outsider", None, set(subs))
    use, missing = held_for_recompute(result, subs)
    assert missing == [] and use == subs
    again = aggregate_submissions(signed, use, paths.__getitem__, MODEL_SHAPES)
    check_recomputed(result, sha256_hex(again.adapter))


def test_a_forged_adapter_fails_the_recomputation(tmp_path, make_manifest):
    """An adapter under the real signed manifest (which passes `check_adapter`) with other
    values: only recomputing the aggregate tells it from the real one."""
    signed, _, subs, paths, agg, result = _round(tmp_path, make_manifest)
    real = aggregate_submissions(signed, subs, paths.__getitem__, MODEL_SHAPES)
    forged = sha256_hex(adapter_bytes({"x": torch.full((2, 2), 7.0)}, signed))
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED) as exc:
        check_recomputed(
            result.model_copy(update={"aggregated_delta_sha": forged}), sha256_hex(real.adapter)
        )
    assert "not the aggregate" in exc.value.message
    check_recomputed(result, sha256_hex(agg.adapter))


def test_own_entry_must_be_what_this_node_signed(tmp_path, make_manifest):
    _, people, subs, _, _, result = _round(tmp_path, make_manifest)
    me = people[1].node_id
    refs = [
        r.model_copy(update={"delta_sha": "00" * 32}) if r.participant == me else r
        for r in result.submissions
    ]
    with raises_code(ErrorCode.SIGNATURE_INVALID) as exc:
        check_listing(result.model_copy(update={"submissions": refs}), me, subs[me], set(subs))
    assert "never signed" in exc.value.message  # an aggregator cannot sign for a participant
    fewer = [
        r.model_copy(update={"num_samples": r.num_samples + 1}) if r.participant == me else r
        for r in result.submissions
    ]
    bumped = result.model_copy(
        update={"submissions": fewer, "total_samples": result.total_samples + 1}
    )
    with raises_code(ErrorCode.SIGNATURE_INVALID):
        check_listing(bumped, me, subs[me], set(subs))
    with raises_code(ErrorCode.SIGNATURE_INVALID):  # totals that do not add up
        check_listing(result.model_copy(update={"total_samples": 1}), "outsider", None, set(subs))
    with raises_code(ErrorCode.SIGNATURE_INVALID):  # included but not listed
        check_listing(result.model_copy(update={"submissions": []}), me, subs[me], set(subs))


def test_a_result_cannot_dodge_recomputation_by_its_listing(tmp_path, make_manifest):
    """A review's bypasses: a phantom participant nobody holds (so no node could recompute), an
    empty listing, a duplicate entry, a participant both included and excluded."""
    _, people, subs, _, _, result = _round(tmp_path, make_manifest)
    me = people[1].node_id
    phantom = NodeIdentity.generate().node_id
    ghost = SubmissionRef(
        participant=phantom, delta_sha="ab" * 32, num_samples=1, signature="00" * 64
    )
    forged = [
        result.model_copy(
            update={
                "included": [*result.included, phantom],
                "submissions": [*result.submissions, ghost],
                "total_samples": result.total_samples + 1,
            }
        ),
        result.model_copy(update={"submissions": []}),
        result.model_copy(
            update={
                "included": [*result.included, result.included[0]],
                "submissions": [*result.submissions, result.submissions[0]],
                "total_samples": result.total_samples + result.submissions[0].num_samples,
            }
        ),
        result.model_copy(
            update={"excluded": [Exclusion(participant=result.included[0], reason="x")]}
        ),
    ]
    for bad in forged:
        with raises_code(ErrorCode.SIGNATURE_INVALID):
            check_listing(bad, me, subs[me], set(subs))
        with raises_code(ErrorCode.SIGNATURE_INVALID):  # a bystander refuses it too
            check_listing(bad, "outsider", None, set(subs))


def test_leaving_out_a_submitter_needs_an_exclusion_naming_it(tmp_path, make_manifest):
    _, people, subs, _, _, result = _round(tmp_path, make_manifest)
    me = people[2].node_id
    rest = [r for r in result.submissions if r.participant != me]
    omitted = result.model_copy(
        update={
            "included": [r.participant for r in rest],
            "submissions": rest,
            "total_samples": sum(r.num_samples for r in rest),
        }
    )
    with raises_code(ErrorCode.SIGNATURE_INVALID) as exc:
        check_listing(omitted, me, subs[me], set(subs))
    assert "without an exclusion" in exc.value.message
    excluded = omitted.model_copy(
        update={"excluded": [Exclusion(participant=me, reason="delta_invalid: late")]}
    )
    check_listing(excluded, me, subs[me], set(subs))


def test_holding_only_some_submissions_checks_no_sha(tmp_path, make_manifest):
    _, people, subs, _, _, result = _round(tmp_path, make_manifest)
    me = people[0].node_id
    use, missing = held_for_recompute(result, {me: subs[me]})
    assert use == {me: subs[me]} and missing == sorted(set(subs) - {me})
    other = people[1].node_id
    resigned = ParticipantSubmission.create(people[1], result.round_id, b"other", 11, 0.1)
    with raises_code(ErrorCode.SIGNATURE_INVALID) as exc:  # two signed submissions conflict
        held_for_recompute(result, {**subs, other: resigned})
    assert "other than the one this node holds" in exc.value.message


def test_every_entry_carries_its_participants_signature(tmp_path, make_manifest):
    """A review listed a participant that joined but never submitted, with a made-up SHA (or
    changed num_samples, or a negative count) so no holder could recompute: the entry must
    carry that participant's own signature."""
    import pydantic
    import pytest

    _, people, subs, _, _, result = _round(tmp_path, make_manifest)
    me = people[0].node_id
    dave = NodeIdentity.generate()
    made_up = SubmissionRef(
        participant=dave.node_id, delta_sha="cd" * 32, num_samples=3, signature="11" * 64
    )
    forged = result.model_copy(
        update={
            "included": [*result.included, dave.node_id],
            "submissions": [*result.submissions, made_up],
            "total_samples": result.total_samples + 3,
        }
    )
    known = {*subs, dave.node_id}  # dave joined: this node saw it
    with raises_code(ErrorCode.SIGNATURE_INVALID) as exc:
        check_listing(forged, me, subs[me], known)
    assert "never signed" in exc.value.message
    bumped = [
        r.model_copy(update={"num_samples": r.num_samples + 1}) if r.participant != me else r
        for r in result.submissions
    ]
    with raises_code(ErrorCode.SIGNATURE_INVALID):
        check_listing(
            result.model_copy(
                update={"submissions": bumped, "total_samples": result.total_samples + 2}
            ),
            me,
            subs[me],
            set(subs),
        )
    with pytest.raises(pydantic.ValidationError):
        SubmissionRef.model_validate({**made_up.model_dump(), "num_samples": -5})
    # What dave really signed, but this node does not hold: a consistent entry, checked in part.
    real = ParticipantSubmission.create(dave, result.round_id, b"dave's", 3, 0.1)
    signed_entry = SubmissionRef(
        participant=dave.node_id,
        delta_sha=real.delta_sha,
        num_samples=3,
        signature=real.signature,
    )
    honest = forged.model_copy(update={"submissions": [*result.submissions, signed_entry]})
    check_listing(honest, me, subs[me], known)
    assert held_for_recompute(honest, subs)[1] == [dave.node_id]
    assert isinstance(result.submissions[0], SubmissionRef)
