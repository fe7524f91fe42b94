import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hearthnet.canonical import (
    canonical_bytes,
    canonical_sha256,
    parse_canonical,
    parse_json,
    sha256_hex,
)
from hearthnet.constants import JSON_MAX_DEPTH
from hearthnet.errors import ErrorCode, HearthnetError
from tests.helpers import raises_code

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@given(json_values)
def test_reencoding_does_not_change_sha(obj):
    first = canonical_bytes(obj)
    again = canonical_bytes(parse_json(first))
    assert again == first
    assert canonical_sha256(parse_canonical(first)) == sha256_hex(first)


@given(st.dictionaries(st.text(max_size=8), st.integers(-1000, 1000), min_size=2, max_size=8))
def test_key_order_does_not_matter(d):
    reversed_dict = dict(reversed(list(d.items())))
    assert canonical_bytes(d) == canonical_bytes(reversed_dict)


def test_known_vector():
    # RFC 8785 §3.2.3-style: sorted keys, no whitespace, shortest numbers.
    assert canonical_bytes({"b": 1.0, "a": [1, "é", None, True], "c": 1e21}) == (
        b'{"a":[1,"\xc3\xa9",null,true],"b":1,"c":1e+21}'
    )


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), -float("inf"), 2**53 + 1, {1: "x"}, {"a": {2: 3}}, b"x"]
)
def test_unrepresentable_values_are_errors(bad):
    with pytest.raises(HearthnetError) as exc:
        canonical_bytes(bad)
    assert exc.value.code is ErrorCode.CANONICAL_INVALID


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "a": 2}',
        '{"x": {"k": 1, "k": 1}}',
        '{"a": NaN}',
        '{"a": Infinity}',
        "[-Infinity]",
        "{not json",
        b"\xff\xfe",
    ],
)
def test_parser_rejects_ambiguous_or_malformed_input(text):
    with pytest.raises(HearthnetError) as exc:
        parse_json(text)
    assert exc.value.code is ErrorCode.CANONICAL_INVALID


def test_parser_bounds_size_and_depth():
    with pytest.raises(HearthnetError) as exc:
        parse_json(b"[" + b"1," * 100 + b"1]", max_bytes=50)
    assert exc.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    deep = "[" * (JSON_MAX_DEPTH + 1) + "]" * (JSON_MAX_DEPTH + 1)
    with raises_code(ErrorCode.CANONICAL_INVALID):
        parse_json(deep)
    very_deep = "[" * 100_000 + "]" * 100_000
    with raises_code(ErrorCode.CANONICAL_INVALID):
        parse_json(very_deep)


def test_parse_canonical_rejects_non_canonical_bytes():
    assert parse_canonical(b'{"a":1,"b":2}') == {"a": 1, "b": 2}
    with raises_code(ErrorCode.CANONICAL_INVALID):
        parse_canonical(b'{"b":2,"a":1}')
    with raises_code(ErrorCode.CANONICAL_INVALID):
        parse_canonical(json.dumps({"a": 1}).encode())  # has a space


def test_large_integral_floats_roundtrip_and_non_canonical_integers_are_refused():
    for value in (2.0**53, 1e16, -1e20, 3.761041973423607e16):
        data = canonical_bytes(value)
        assert canonical_bytes(parse_json(data)) == data
    with raises_code(ErrorCode.CANONICAL_INVALID):
        parse_canonical(b"9007199254740993")  # 2^53 + 1 re-encodes as ...992
