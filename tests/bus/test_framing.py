"""The session framing rules, without sockets: fed frames, checked for the events it returns."""

import hashlib
import json
import os

import pytest

from hearthnet import constants as C
from hearthnet.bus.framing import Disconnect, Framing, Received, Refused, blob_ref
from hearthnet.bus.protocol import EventMsg, Hello, Request, Response, Subscribe, encode
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.identity import NodeIdentity

MIB = C.BLOB_FRAGMENT_BYTES


def _req(req_id: int, blob: bytes | None = None, sha: str | None = None) -> str:
    ref = None
    if blob is not None:
        ref = blob_ref(blob, sha or hashlib.sha256(blob).hexdigest())
    return encode(Request(t="req", id=req_id, cap="node.ping", body={}, blob=ref))


def _feed_blob(framing: Framing, blob: bytes) -> list:
    events = []
    for i in range(0, len(blob), MIB):
        events += framing.receive_fragment(blob[i : i + MIB])
    return events + framing.end_message()


def test_a_blob_follows_its_announcement_fragment_by_fragment():
    framing = Framing()
    blob = os.urandom(3 * MIB + 17)
    assert framing.receive_message(_req(1, blob)) == []  # nothing until its blob is in
    events = []
    for i in range(0, len(blob), MIB):
        events += framing.receive_fragment(blob[i : i + MIB])
        assert events == []  # each fragment is hashed as it comes; the check is at the end
    events += framing.end_message()
    [got] = events
    assert isinstance(got, Received) and isinstance(got.msg, Request) and got.msg.id == 1
    assert len(got.fragments or ()) == 4 and got.blob_size == len(blob)
    assert got.join() == blob
    assert framing.errors == 0
    # the next message is a plain one again
    [plain] = framing.receive_message(_req(2))
    assert isinstance(plain, Received) and plain.fragments is None and plain.join() is None


def test_what_framing_sends_it_receives():
    sender, receiver = Framing(), Framing()
    blob = os.urandom(2 * MIB + 5)
    req = sender.request(
        "node.ping", {"x": 1}, 5.0, blob_ref(blob, hashlib.sha256(blob).hexdigest())
    )
    text, fragments = sender.frames(req, blob)
    assert fragments is not None and [len(f) for f in fragments] == [MIB, MIB, 5]
    assert receiver.receive_message(text) == []
    for fragment in fragments:
        assert receiver.receive_fragment(bytes(fragment)) == []
    [got] = receiver.end_message()
    assert isinstance(got, Received) and got.msg == req and got.join() == blob
    # an empty blob still goes as one (empty) binary message
    empty = sender.request("node.ping", {}, 5.0, blob_ref(b"", hashlib.sha256(b"").hexdigest()))
    text, fragments = sender.frames(empty, b"")
    assert fragments is not None and [len(f) for f in fragments] == [0]
    receiver.receive_message(text)
    [got] = receiver.receive_message(b"")
    assert isinstance(got, Received) and got.join() == b""


def test_a_blob_is_sent_with_exactly_its_announcement():
    framing = Framing()
    blob = b"abc"
    with pytest.raises(ValueError):
        framing.frames(Request(t="req", id=1, cap="node.ping", body={}), blob)
    with pytest.raises(ValueError):
        framing.frames(
            Request(t="req", id=1, cap="node.ping", body={}, blob=blob_ref(blob, "0" * 64))
        )
    with pytest.raises(ValueError):
        framing.frames(
            Request(t="req", id=1, cap="node.ping", body={}, blob=blob_ref(b"abcd", "0" * 64)),
            blob,
        )


def test_a_blob_with_the_wrong_sha_is_refused_and_answered():
    framing = Framing()
    blob = os.urandom(MIB + 1)
    framing.receive_message(_req(7, blob, sha="0" * 64))
    [refused] = _feed_blob(framing, blob)
    assert isinstance(refused, Refused) and refused.kind == "blob_sha_mismatch"
    assert isinstance(refused.answer, Request) and refused.answer.id == 7
    assert refused.error is not None and refused.error.code is ErrorCode.BLOB_CORRUPT
    assert framing.errors == 1


def test_a_blob_longer_than_announced_is_refused_and_not_kept():
    framing = Framing()
    blob = os.urandom(MIB)
    framing.receive_message(_req(3, blob))
    events = []
    for _ in range(4):
        events += framing.receive_fragment(blob)
        assert sum(map(len, framing._parts)) <= len(blob)  # never more than announced
    events += framing.end_message()
    assert [type(e) for e in events] == [Refused] and events[0].kind == "blob_sha_mismatch"
    # and a shorter one
    framing.receive_message(_req(4, blob))
    [short] = _feed_blob(framing, blob[:-1])
    assert isinstance(short, Refused) and short.kind == "blob_sha_mismatch"


def test_a_fragment_without_announcement_is_one_refusal_per_message():
    framing = Framing()
    events = framing.receive_fragment(os.urandom(10))
    events += framing.receive_fragment(os.urandom(10))
    events += framing.end_message()
    [refused] = events
    assert isinstance(refused, Refused) and refused.kind == "unexpected_binary"
    assert refused.answer is None and framing.errors == 1
    [ok] = framing.receive_message(_req(1))
    assert isinstance(ok, Received)


def test_an_oversize_blob_is_refused_from_its_announcement_and_discarded_unread():
    framing = Framing(max_blob=MIB)
    blob = os.urandom(MIB + 1)
    [refused] = framing.receive_message(_req(5, blob))
    assert isinstance(refused, Refused) and refused.kind == "oversize_blob"
    assert refused.error is not None and refused.error.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert isinstance(refused.answer, Request) and refused.answer.id == 5
    assert _feed_blob(framing, blob) == []  # its blob: dropped, not a second strike
    assert framing.errors == 1 and framing._parts == []
    # only the very next message is excused: a binary after a text one is refused again
    framing.receive_message(_req(6, blob))
    framing.receive_message(_req(7))
    [again] = framing.receive_message(blob)
    assert isinstance(again, Refused) and again.kind == "unexpected_binary"


def test_an_oversize_control_frame_is_refused():
    framing = Framing()
    big = json.dumps(
        {"t": "req", "id": 1, "cap": "node.ping", "body": {"x": "a" * C.CONTROL_FRAME_MAX_BYTES}}
    )
    events = []
    for i in range(0, len(big), 64 * 1024):
        events += framing.receive_fragment(big[i : i + 64 * 1024])
    events += framing.end_message()
    [refused] = events
    assert isinstance(refused, Refused) and refused.kind == "oversize_frame"
    assert sum(len(t) for t in framing._texts) == 0  # not kept past the limit, then reset


def test_a_text_frame_where_the_blob_was_due_refuses_the_blob_and_is_read():
    framing = Framing()
    blob = os.urandom(2 * MIB)
    framing.receive_message(_req(1, blob))
    [missing, ping] = framing.receive_message(_req(2))
    assert isinstance(missing, Refused) and missing.kind == "missing_blob"
    assert isinstance(missing.answer, Request) and missing.answer.id == 1
    assert missing.error is not None and missing.error.code is ErrorCode.BAD_REQUEST
    assert isinstance(ping, Received) and ping.msg.id == 2  # type: ignore[union-attr]
    # a text frame in the middle of the blob's fragments: the blob is missing too
    framing.receive_message(_req(3, blob))
    assert framing.receive_fragment(blob[:MIB]) == []
    [missing, ping] = framing.receive_message(_req(4))
    assert isinstance(missing, Refused) and missing.kind == "missing_blob"
    assert missing.answer is not None and missing.answer.id == 3
    assert isinstance(ping, Received) and ping.msg.id == 4  # type: ignore[union-attr]
    assert framing.errors == 2


def test_hello_after_the_handshake_is_refused():
    framing = Framing()
    hello = Hello(
        t="hello",
        v="1",
        net="n",
        role="dialer",
        node=NodeIdentity.generate().node_id,
        nonce="ab" * C.HANDSHAKE_NONCE_BYTES,
    )
    [refused] = framing.receive_message(encode(hello))
    assert isinstance(refused, Refused) and refused.kind == "unexpected_message"


def test_twenty_refusals_disconnect_and_nothing_is_read_after():
    framing = Framing()
    for _ in range(C.PEER_MAX_PROTOCOL_ERRORS - 2):
        [refused] = framing.receive_message("{not json")
        assert isinstance(refused, Refused) and refused.kind == "malformed_frame"
    assert framing.strike() is False  # the driver's own refusals share the budget
    last = framing.receive_message('{"t":"nope"}')
    assert [type(e) for e in last] == [Refused, Disconnect]
    assert framing.closing and framing.errors == C.PEER_MAX_PROTOCOL_ERRORS
    assert framing.receive_message(_req(1)) == []
    assert framing.receive_message(b"x") == []
    assert framing.strike() is False  # Disconnect is said once


def test_request_ids_pair_answers_once():
    framing = Framing(max_pending=2)
    a = framing.request("node.ping", {}, 5.0, None)
    sub_id = framing.next_id()
    b = framing.request("node.ping", {}, 5.0, None)
    assert (a.id, sub_id, b.id) == (1, 2, 3)
    assert framing.awaiting == 2
    with pytest.raises(HearthnetError) as info:
        framing.request("node.ping", {}, 5.0, None)
    assert info.value.code is ErrorCode.OVERLOADED
    answer = encode(Response(t="res", id=a.id, ok=True, body={}))
    [got] = framing.receive_message(answer)
    assert isinstance(got, Received) and got.msg.id == a.id  # type: ignore[union-attr]
    assert framing.receive_message(answer) == []  # a second answer: dropped
    assert framing.receive_message(encode(Response(t="res", id=99, ok=True))) == []  # unknown
    framing.settled(b.id)  # timed out
    assert framing.receive_message(encode(Response(t="res", id=b.id, ok=True))) == []
    assert framing.awaiting == 0 and framing.errors == 0  # late answers are not abuse
    # a late answer's blob is still consumed, then dropped
    blob = os.urandom(100)
    late = Response(
        t="res", id=b.id, ok=True, blob=blob_ref(blob, hashlib.sha256(blob).hexdigest())
    )
    assert framing.receive_message(encode(late)) == []
    assert framing.receive_message(blob) == [] and framing.errors == 0
    # requests and events from the peer are delivered whatever their ids
    [sub] = framing.receive_message(encode(Subscribe(t="sub", id=1, prefix="node.")))
    [evt] = framing.receive_message(encode(EventMsg(t="evt", sub=12345)))
    assert isinstance(sub, Received) and isinstance(evt, Received)


def test_an_outgoing_blob_over_the_limit_is_refused():
    framing = Framing(max_blob=10)
    with pytest.raises(HearthnetError) as info:
        framing.request("node.ping", {}, 5.0, blob_ref(b"x" * 11, "0" * 64))
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE and framing.awaiting == 0
