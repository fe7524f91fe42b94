import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from hearthnet.bus.handshake import make_hello, sign_auth, transcript, verify_auth
from hearthnet.bus.protocol import Auth, Hello, decode, encode
from hearthnet.bus.tls import client_context, listener_binding
from hearthnet.config import NodeConfig, config_from_dict
from hearthnet.identity import NodeIdentity
from hearthnet.node import Node

TLS = client_context()  # what any client of a node must speak (tests/bus: raw attackers too)


def ssl_object(ws: ClientConnection) -> Any:
    return ws.transport.get_extra_info("ssl_object")


def node_config(
    tmp: Path, name: str, port: int = 0, peers: list[Any] | None = None, **sections: Any
) -> NodeConfig:
    data: dict[str, Any] = {
        "node": {"name": name, "data_dir": str(tmp / name), "network_id": "test-net"},
        "listen": {"host": "127.0.0.1", "port": port},
        # a bare URL accepts whichever node answers; a dict (url, node_id) pins it
        "peers": [p if isinstance(p, dict) else {"url": p, "any_node": True} for p in peers or []],
        **sections,
    }
    return config_from_dict(data, tmp)


@pytest.fixture
async def make_node(tmp_path) -> AsyncIterator[Callable[..., Any]]:
    nodes: list[Node] = []

    async def make(
        name: str,
        port: int = 0,
        peers: list[Any] | None = None,
        identity: NodeIdentity | None = None,
        start: bool = True,
        setup: Callable[[Node], None] | None = None,
        **sections: Any,
    ) -> Node:
        config = node_config(tmp_path, name, port, peers, **sections)
        node = Node(config, identity or NodeIdentity.generate())
        if setup is not None:
            setup(node)
        if start:
            await node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        with contextlib.suppress(Exception):
            await node.stop()


class RawPeer:
    """A real, authenticated peer that can then send anything (for bad-input tests)."""

    def __init__(self, ws: ClientConnection, hello: Hello, auth: Auth, theirs: Hello):
        self.ws, self.hello, self.auth, self.theirs = ws, hello, auth, theirs

    @classmethod
    async def connect(cls, url: str, identity: NodeIdentity, net: str = "test-net") -> "RawPeer":
        # offers deflate; the node must refuse
        ws = await connect(url, proxy=None, max_size=2**27, ssl=TLS)
        mine = make_hello(identity, net, "dialer")
        await ws.send(encode(mine))
        theirs = decode(await ws.recv())
        assert isinstance(theirs, Hello)
        data = transcript(mine, theirs, listener_binding(ssl_object(ws), theirs.node))
        auth = sign_auth(identity, "dialer", data)
        await ws.send(encode(auth))
        their_auth = decode(await ws.recv())
        assert isinstance(their_auth, Auth)
        verify_auth(theirs, data, their_auth)
        return cls(ws, mine, auth, theirs)

    async def recv_json(self) -> dict[str, Any]:
        import json

        while True:
            frame = await self.ws.recv()
            if isinstance(frame, str):
                return json.loads(frame)
