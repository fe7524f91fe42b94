"""The encrypted channel against relays, on real nodes over loopback (issue 13, item 4)."""

import asyncio
import contextlib
import os

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage

from hearthnet.bus.handshake import make_hello, sign_auth, transcript
from hearthnet.bus.protocol import Auth, Hello, decode, encode
from hearthnet.bus.tls import binding, client_context, listener_binding, server_context
from hearthnet.errors import ErrorCode
from hearthnet.identity import NodeIdentity
from tests.helpers import raises_code

from .conftest import TLS, ssl_object
from .test_transport import Echo, EchoReply, with_echo


class Relay:
    """A hostile node in the middle: dialers reach it at the URL they were given, and it
    forwards to the real listener. `terminate=True` ends TLS on both sides with its own key
    (so it can read and write the plaintext); otherwise it forwards TCP bytes as they are."""

    def __init__(self, target_port: int, terminate: bool):
        self.target_port, self.terminate = target_port, terminate
        self.identity = NodeIdentity.generate()
        self.seen = bytearray()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        tls = server_context(self.identity)[0] if self.terminate else None
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0, ssl=tls)
        return f"wss://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(
            "127.0.0.1", self.target_port, ssl=TLS if self.terminate else None
        )

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    self.seen += data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_w), copy(up_r, writer))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def relay():
    made: list[Relay] = []

    async def make(port: int, terminate: bool) -> tuple[Relay, str]:
        r = Relay(port, terminate)
        made.append(r)
        return r, await r.start()

    yield make
    for r in made:
        await r.stop()


async def test_a_relay_that_terminates_tls_gets_no_session(make_node, relay):
    """The README-style configuration (a peer URL, whichever node answers) through a relay
    that decrypts: the dialer sees the relay's certificate, not the NodeID that says hello."""
    a = await make_node("a", setup=with_echo)
    _, url = await relay(a.transport.listen_address[1], terminate=True)
    b = await make_node("b", peers=[url], setup=with_echo)
    pinned = await make_node("p", peers=[{"url": url, "node_id": a.node_id}])
    await asyncio.sleep(1.5)
    assert a.node_id not in b.transport.peers and a.node_id not in pinned.transport.peers
    assert b.transport.stats["handshake_failed"] >= 1
    assert pinned.transport.stats["handshake_failed"] >= 1
    assert not a.transport.peers  # nobody got a session at the listener either
    with raises_code(ErrorCode.PEER_NOT_CONNECTED):
        await b.bus.call("test.echo", Echo(text="x"), peer=a.node_id)


async def test_a_dialer_that_signs_the_relays_channel_is_refused_by_the_listener(make_node, relay):
    """A dialer that ignores the mismatch (or colludes) signs the certificate it saw; the
    listener checks the signature against its own certificate, so the relay still gets no
    session it could inject into."""
    a = await make_node("a", setup=with_echo)
    _, url = await relay(a.transport.listen_address[1], terminate=True)
    ident = NodeIdentity.generate()
    async with connect(url, proxy=None, ssl=TLS) as ws:
        seen = binding(ssl_object(ws).getpeercert(binary_form=True))  # the relay's
        mine = make_hello(ident, "test-net", "dialer")
        await ws.send(encode(mine))
        theirs = decode(await ws.recv())
        assert isinstance(theirs, Hello) and theirs.node == a.node_id
        with raises_code(ErrorCode.HANDSHAKE_FAILED):
            listener_binding(ssl_object(ws), theirs.node)
        assert isinstance(decode(await ws.recv()), Auth)
        await ws.send(encode(sign_auth(ident, "dialer", transcript(mine, theirs, seen))))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert not a.transport.peers and a.transport.stats["handshake_failed"] == 1


async def test_a_relay_that_forwards_bytes_sees_only_ciphertext(make_node, relay):
    """Through a byte-forwarding relay the session works, pinned, and nothing it carries is
    readable: neither the capability called, the text, the NodeIDs nor a blob."""
    a = await make_node("a", setup=with_echo)
    r, url = await relay(a.transport.listen_address[1], terminate=False)
    b = await make_node("b", peers=[{"url": url, "node_id": a.node_id}], setup=with_echo)
    await b.wait_for_peer(a.node_id)
    marker, blob = "secret-notice-" + os.urandom(8).hex(), os.urandom(200_000)
    reply, back = await b.bus.call_blob(
        "test.echo", Echo(text=marker), peer=a.node_id, blob=blob, timeout=10
    )
    assert isinstance(reply, EchoReply) and reply.text == marker and back == blob
    seen = bytes(r.seen)
    assert len(seen) > len(blob)  # it did carry the traffic
    for plain in (marker.encode(), b"test.echo", a.node_id.encode(), b.node_id.encode(), blob[:64]):
        assert plain not in seen


async def test_a_plaintext_client_is_not_served(make_node):
    a = await make_node("a")
    with pytest.raises((InvalidMessage, ConnectionError, OSError, EOFError)):
        async with connect(a.listen_url.replace("wss://", "ws://"), proxy=None, open_timeout=5):
            pass
    assert not a.transport.peers


def test_the_certificate_carries_the_identity_key_and_is_stable():
    ident = NodeIdentity.generate()
    _, b1 = server_context(ident)
    _, b2 = server_context(ident)
    assert b1 == b2  # the same key gives the same certificate: restarts keep the binding
    assert server_context(NodeIdentity.generate())[1] != b1
    assert client_context().check_hostname is False
    with raises_code(ErrorCode.HANDSHAKE_FAILED):
        listener_binding(None, ident.node_id)
