import json

import pytest

from hearthnet.errors import ErrorCode, HearthnetError

SPEC_CODES = {
    "experimental_disabled",
    "signature_invalid",
    "base_model_mismatch",
    "insufficient_resources",
    "consent_required",
    "round_full",
    "round_closed",
    "delta_invalid",
    "fedlearn_aggregation_failed",
    "fedlearn_min_participants_unmet",
    "fedlearn_aggregator_unreachable",
    "adapter_not_found",
}


def test_every_spec_code_exists():
    assert {c.value for c in ErrorCode} >= SPEC_CODES


@pytest.mark.parametrize("code", list(ErrorCode))
def test_roundtrip_through_json(code):
    err = HearthnetError(code, "something broke", {"key": "lora.B", "n": 3})
    wire = json.loads(json.dumps(err.to_dict()))
    back = HearthnetError.from_dict(wire)
    assert back.code is code
    assert back == err
    assert back.detail == {"key": "lora.B", "n": 3}


def test_detail_is_optional():
    err = HearthnetError(ErrorCode.ROUND_FULL, "full")
    assert "detail" not in err.to_dict()
    assert HearthnetError.from_dict(err.to_dict()).detail is None


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        "x",
        {"code": "round_full"},
        {"code": "round_full", "message": 3},
        {"code": "round_full", "message": "m", "detail": [1]},
    ],
)
def test_malformed_error_object_becomes_protocol_error(bad):
    assert HearthnetError.from_dict(bad).code is ErrorCode.PROTOCOL_ERROR


def test_unknown_remote_code_is_kept_in_detail():
    err = HearthnetError.from_dict({"code": "from_the_future", "message": "hi"})
    assert err.code is ErrorCode.PROTOCOL_ERROR
    assert err.detail == {"remote_code": "from_the_future"}
    assert err.message == "hi"
