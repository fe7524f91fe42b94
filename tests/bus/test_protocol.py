import pytest

from hearthnet import constants as C
from hearthnet.bus.handshake import check_hello, make_hello, sign_auth, transcript, verify_auth
from hearthnet.bus.protocol import Request, Response, decode, encode
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.identity import NodeIdentity
from tests.helpers import raises_code


def test_roundtrip_of_every_message_kind():
    msgs = [
        '{"t":"req","id":1,"cap":"node.info","body":{}}',
        '{"t":"res","id":1,"ok":true,"body":{"a":1}}',
        '{"t":"res","id":2,"ok":false,"error":{"code":"round_full","message":"m"}}',
        '{"t":"sub","id":3,"prefix":"node.","after_seq":0}',
        '{"t":"unsub","id":3}',
        '{"t":"evt","sub":3}',
    ]
    for text in msgs:
        msg = decode(text)
        assert decode(encode(msg)) == msg
    req = decode(
        '{"t":"req","id":9,"cap":"x.y","body":{},"blob":{"sha":"' + "a" * 64 + '","size":5}}'
    )
    assert isinstance(req, Request) and req.blob is not None and req.blob.size == 5
    assert isinstance(decode('{"t":"res","id":1,"ok":true}'), Response)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{}",
        '{"t":"nope"}',
        '{"t":"req","id":-1,"cap":"a","body":{}}',
        '{"t":"req","id":1,"cap":"Bad Name","body":{}}',
        '{"t":"req","id":1,"cap":"a","body":[]}',
        '{"t":"req","id":1,"cap":"a","body":{},"extra":1}',
        '{"t":"req","id":"1","cap":"a","body":{}}',
        '{"t":"req","id":1,"id":2,"cap":"a","body":{}}',
        '{"t":"req","id":1,"cap":"a","body":{},"timeout":1e9}',
        "\xff",
    ],
)
def test_malformed_frames_are_bad_request(text):
    with pytest.raises(HearthnetError) as exc:
        decode(text)
    assert exc.value.code is ErrorCode.BAD_REQUEST


def test_oversize_frame():
    with pytest.raises(HearthnetError) as exc:
        decode("x" * (C.CONTROL_FRAME_MAX_BYTES + 1))
    assert exc.value.code is ErrorCode.PAYLOAD_TOO_LARGE


def test_handshake_transcript_binds_everything():
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    CH = "cd" * 32  # the listener certificate's SHA-256
    ha, hb = make_hello(a, "net", "dialer"), make_hello(b, "net", "listener")
    check_hello(ha, "net", "dialer")
    data = transcript(ha, hb, CH)
    auth = sign_auth(a, "dialer", data)
    verify_auth(ha, data, auth)
    # The same signature does not verify under another listener nonce (replay) ...
    hb2 = make_hello(b, "net", "listener")
    with raises_code(ErrorCode.HANDSHAKE_FAILED):
        verify_auth(ha, transcript(ha, hb2, CH), auth)
    # ... nor over another TLS channel (a relay that terminates TLS shows another certificate) ...
    with raises_code(ErrorCode.HANDSHAKE_FAILED):
        verify_auth(ha, transcript(ha, hb, "ef" * 32), auth)
    # ... nor reflected as the other role, nor for another network.
    with raises_code(ErrorCode.HANDSHAKE_FAILED):
        verify_auth(hb.model_copy(update={"node": a.node_id}), data, auth)
    with raises_code(ErrorCode.HANDSHAKE_FAILED):
        verify_auth(ha, transcript(ha.model_copy(update={"net": "other"}), hb, CH), auth)
    for bad, role in [
        (ha.model_copy(update={"net": "x"}), "dialer"),
        (ha.model_copy(update={"v": "hearthnet/0"}), "dialer"),
        (ha, "listener"),
        (ha.model_copy(update={"node": "hnbogus"}), "dialer"),
    ]:
        with pytest.raises(HearthnetError) as exc:
            check_hello(bad, "net", role)
        assert exc.value.code is ErrorCode.HANDSHAKE_FAILED
    with raises_code(ErrorCode.HANDSHAKE_FAILED):
        transcript(ha, ha.model_copy(update={"role": "listener"}), CH)  # nonce reuse


def test_frames_with_too_many_json_values_are_refused_before_parsing():
    import time

    n = C.CONTROL_FRAME_MAX_JSON_VALUES
    ok = '{"t":"req","id":1,"cap":"node.ping","body":{"x":[' + ",".join(["1"] * (n - 8)) + "]}}"
    assert isinstance(decode(ok), Request)
    for hostile in (
        '{"t":"req","id":1,"cap":"node.ping","body":{"x":[' + ",".join(["1"] * 500_000) + "]}}",
        "[" * (C.CONTROL_FRAME_MAX_BYTES // 2),
        '{"t":"req","id":1,"cap":"a","body":{"s":"' + "," * n + '"}}',  # counted in strings too
    ):
        assert len(hostile) <= C.CONTROL_FRAME_MAX_BYTES
        started = time.perf_counter()
        with raises_code(ErrorCode.PAYLOAD_TOO_LARGE):
            decode(hostile)
        assert time.perf_counter() - started < 0.05  # a byte scan, not a parse (~0.2 s)
