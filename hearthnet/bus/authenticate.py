"""The hello/auth exchange on a fresh connection, both roles (the messages and what is signed
are `handshake.py`; this is the I/O around them).

The dialer knows who answered from the TLS certificate (`tls.py`) and checks a pinned NodeID
before it says anything; both sides sign the transcript bound to the listener's certificate;
the roster is checked last, after both signatures verify, so an outsider claiming a NodeID
learns nothing about the roster from how far its handshake gets. `FrameLimits` keeps every
message small until the peer's auth verifies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from websockets.asyncio.connection import Connection

from hearthnet import constants as C
from hearthnet.bus.handshake import check_hello, make_hello, sign_auth, transcript, verify_auth
from hearthnet.bus.limits import FrameLimits
from hearthnet.bus.protocol import Auth, Hello, decode, encode
from hearthnet.bus.tls import listener_identity
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.identity import NodeID, NodeIdentity


async def _recv_control(ws: Connection) -> Any:
    frame = await ws.recv()
    if not isinstance(frame, str):
        raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "binary frame during the handshake")
    return decode(frame)


async def authenticate(
    ws: Connection,
    identity: NodeIdentity,
    net: str,
    role: str,
    binding: str,
    expected: str | None,
    allows: Callable[[str], bool],
) -> NodeID:
    """The peer's NodeID once both handshake signatures verify and `allows` admits it.
    `binding` is this node's own certificate binding (used as listener); `expected` is the
    NodeID a dialer's peer entry pins, if any."""
    limits = FrameLimits(ws.protocol, ws.transport.get_write_buffer_size)
    async with asyncio.timeout(C.HANDSHAKE_TIMEOUT_S):
        if role == "dialer":
            # Who answered is known from TLS: a pinned peer is checked before we say who we
            # are (our hello names our NodeID and network).
            node, channel = listener_identity(ws.transport.get_extra_info("ssl_object"))
            if expected is not None and node != expected:
                raise HearthnetError(
                    ErrorCode.HANDSHAKE_FAILED,
                    f"the node answering is {node}, not the {expected} that [[peers]] "
                    "node_id pins: fix node_id (`hearthnet id` on the peer) or the url",
                )
            if node == identity.node_id:
                raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "connected to itself")
            mine = make_hello(identity, net, "dialer")
            await ws.send(encode(mine))
            theirs = await _recv_control(ws)
            if not isinstance(theirs, Hello):
                raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "expected hello")
            check_hello(theirs, net, "listener")
            if theirs.node != node:
                raise HearthnetError(
                    ErrorCode.HANDSHAKE_FAILED,
                    "the listener's TLS key is not the NodeID it claims (a relay in between?)",
                )
            data = transcript(mine, theirs, channel)
            limits.expect_auth(theirs, data)
        else:
            theirs = await _recv_control(ws)
            if not isinstance(theirs, Hello):
                raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "expected hello")
            check_hello(theirs, net, "dialer")
            if theirs.node == identity.node_id:
                raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "connected to itself")
            mine = make_hello(identity, net, "listener")
            data = transcript(theirs, mine, binding)
            limits.expect_auth(theirs, data)
            await ws.send(encode(mine))
        await ws.send(encode(sign_auth(identity, role, data)))
        auth = await _recv_control(ws)
        if not isinstance(auth, Auth):
            raise HearthnetError(ErrorCode.HANDSHAKE_FAILED, "expected auth")
        verify_auth(theirs, data, auth)
        if not allows(theirs.node):
            raise HearthnetError(
                ErrorCode.FORBIDDEN, "peer is not a member of this community ([trust] roster)"
            )
    limits.open()  # normally done already, before their next frame; here for odd framings
    return NodeID(theirs.node)
