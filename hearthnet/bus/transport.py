"""WebSocket transport: listen, dial configured peers with backoff, authenticate, route calls.

One connection per peer pair, whoever dialled: when two come up between the same nodes, both
sides keep the one dialled by the smaller NodeID and close the other. Compression is off (blobs
are incompressible deltas and compression invites decompression bombs); websockets' pings detect
dead peers; every frame, queue and wait is bounded by a constant.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import CloseCode

from hearthnet import constants as C
from hearthnet.bus.authenticate import authenticate
from hearthnet.bus.bus import CapabilityBus
from hearthnet.bus.gate import ConnectionGate, GatedConnection, gated
from hearthnet.bus.limits import AcceptErrors, SummaryLog
from hearthnet.bus.peer import EventPolicy, PeerConnection, RemoteSubscription
from hearthnet.bus.tls import client_context, server_context
from hearthnet.config import NodeConfig, PeerConfig
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import EventLog
from hearthnet.identity import NodeID, NodeIdentity
from hearthnet.logs import get_logger
from hearthnet.tasks import Spawner

log = get_logger("hearthnet.transport")

_WS_OPTIONS: dict[str, Any] = {
    "compression": None,
    # Until both handshake signatures verify; FrameLimits raises it for an authenticated peer.
    "max_size": C.HANDSHAKE_MAX_MESSAGE_BYTES,
    "max_queue": C.WS_MAX_QUEUE_FRAMES,
    "write_limit": C.WS_WRITE_LIMIT_BYTES,
    "ping_interval": C.WS_PING_INTERVAL_S,
    "ping_timeout": C.WS_PING_TIMEOUT_S,
    "close_timeout": C.WS_CLOSE_TIMEOUT_S,
    "open_timeout": C.HANDSHAKE_TIMEOUT_S,
}

PeerHook = Callable[[NodeID], None]


def listen_error(host: str, port: int, exc: OSError) -> HearthnetError:
    """What an operator can do about a listen address that cannot be bound."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return HearthnetError(
            ErrorCode.ADDRESS_IN_USE,
            f"cannot listen on {where}: the port is in use (another node running?); choose a "
            "free one in the config's [listen] port (or `hearthnet init --port`)",
        )
    return HearthnetError(
        ErrorCode.CONFIG_INVALID,
        f"cannot listen on {where}: {exc.strerror or exc}; check [listen] host and port",
    )


async def check_listen(host: str, port: int) -> None:
    """Bind and release the listen address, so a taken port fails a start before anything slow
    (loading a model) runs. Port 0 always binds."""
    if port == 0:
        return
    try:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port)
    except OSError as exc:
        raise listen_error(host, port, exc) from None
    server.close()
    await server.wait_closed()


class Transport:
    """Every connection of the node: the listener, a dial loop per configured peer, the caps on
    connections and handshakes, and the table of live sessions the bus calls through."""

    def __init__(
        self,
        identity: NodeIdentity,
        config: NodeConfig,
        bus: CapabilityBus,
        eventlog: EventLog | None,
        policy: EventPolicy,
    ):
        self.identity = identity
        self.config = config
        self.bus = bus
        self.eventlog = eventlog
        self.policy = policy
        self.stats: Counter[str] = Counter()
        self.peers: dict[NodeID, PeerConnection] = {}
        self._server: Server | None = None
        self._tasks = Spawner("transport")
        self._url_node: dict[str, NodeID] = {}
        self._changed = asyncio.Condition()
        self._peer_hooks: list[PeerHook] = []
        self.gate = ConnectionGate()
        self._handshake_failures = SummaryLog("handshakes failed")
        self._tls, self._binding = server_context(identity)
        self._tls_client = client_context()
        self._accept_errors: AcceptErrors | None = None
        bus.remote = self

    def on_peer(self, hook: PeerHook) -> None:
        """Call `hook(node)` each time a session with a peer is established. It runs on the
        event loop before the session reads its first frame, so it must not block: start a task
        to talk to the peer."""
        self._peer_hooks.append(hook)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (TLS) and start dialling every `[[peers]]` entry with backoff."""
        host, port = self.config.listen.host, self.config.listen.port
        try:
            self._server = await serve(
                self._accept,
                host,
                port,
                create_connection=gated(self.gate, self._tls, self._refused, self._tls_failed),
                **_WS_OPTIONS,
            )
        except OSError as exc:
            raise listen_error(host, port, exc) from None
        self._accept_errors = AcceptErrors(
            asyncio.get_running_loop(), self._server.sockets, self.stats
        )
        for peer in self.config.peers:
            self._tasks.spawn(self._dial_loop(peer), f"dial {peer.url}")

    @property
    def listen_address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when the config asked for port 0."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def stop(self) -> None:
        """Stop dialling, close every session and the listener, and wait for their tasks."""
        self._tasks.cancel()
        if self._server is not None:
            self._server.close()
        for peer in list(self.peers.values()):
            with contextlib.suppress(Exception):
                await peer.close(1001, "node shutting down")
        if self._server is not None:
            await self._server.wait_closed()
        await self._tasks.wait()
        if self._accept_errors is not None:
            self._accept_errors.close()

    # --- handshake ----------------------------------------------------------------------------

    async def _handshake(self, ws: Connection, role: str, expected: str | None = None) -> NodeID:
        """Run the mutual handshake on a fresh connection (`authenticate.py`)."""
        return await authenticate(
            ws,
            self.identity,
            self.config.node.network_id,
            role,
            self._binding,
            expected,
            self.config.trust.allows,
        )

    def _refused(self, reason: str) -> None:
        """A connection beyond the caps, aborted at TCP accept: counted, one line per 10 s."""
        self.stats["connection_refused"] += 1
        self.gate.refusals.refused(reason)

    def _tls_failed(self, exc: BaseException, address: str) -> None:
        self._handshake_failed(exc, f"TLS from {address}")

    def _handshake_failed(self, exc: BaseException, where: str) -> None:
        kind = (
            "handshake_refused"
            if (isinstance(exc, HearthnetError) and exc.code is ErrorCode.FORBIDDEN)
            else "handshake_failed"
        )
        self.stats[kind] += 1
        reason = exc.message if isinstance(exc, HearthnetError) else type(exc).__name__
        self._handshake_failures.refused(reason, where=where)  # a flood costs one line per 10 s

    # --- connections --------------------------------------------------------------------------

    async def _accept(self, ws: ServerConnection) -> None:
        where = f"from {_host_port(ws.remote_address)}"  # gone once the socket closes
        try:
            node = await self._handshake(ws, "listener")
        except (HearthnetError, TimeoutError, ConnectionClosed) as exc:
            self._handshake_failed(exc, where)
            with contextlib.suppress(Exception):
                await ws.close(1008, "handshake failed")
            return
        finally:
            if isinstance(ws, GatedConnection):
                ws.handshake_finished()
        await self._serve_peer(ws, node, dialer=node)

    async def _serve_peer(self, ws: Connection, node: NodeID, dialer: NodeID) -> None:
        peer = PeerConnection(ws, node, dialer, self.bus, self.eventlog, self.policy, self.stats)
        if not await self._register(peer):
            await ws.close(1000, "duplicate connection")
            return
        log.info("peer connected", peer=node, inbound=dialer == node)
        for hook in self._peer_hooks:
            try:
                hook(node)
            except Exception:  # a module's hook must not take the session down
                log.exception("peer hook failed", peer=node)
        try:
            await peer.run()
        finally:
            self._count_refused_frame(ws, node)
            async with self._changed:
                if self.peers.get(node) is peer:
                    del self.peers[node]
                self._changed.notify_all()
            log.info("peer disconnected", peer=node)

    def _count_refused_frame(self, ws: Connection, node: NodeID) -> None:
        """websockets closes with 1009 on a frame over FrameLimits' bounds: count it as bad
        input."""
        sent = ws.protocol.close_sent
        if sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG:
            self.stats["oversize_frame"] += 1
            log.warning("bad input from peer", peer=node, kind="oversize_frame", reason=sent.reason)

    async def _register(self, peer: PeerConnection) -> bool:
        """Keep one connection per pair: the one dialled by the smaller NodeID wins."""
        async with self._changed:
            existing = self.peers.get(peer.node_id)
            if existing is not None and not existing.closed.is_set():
                preferred = min(self.identity.node_id, peer.node_id)
                if existing.dialer == preferred or peer.dialer != preferred:
                    return False
                await existing.close(1000, "duplicate connection")
            self.peers[peer.node_id] = peer
            self._changed.notify_all()
        return True

    async def _dial_loop(self, cfg: PeerConfig) -> None:
        delay = C.RECONNECT_BACKOFF_MIN_S
        while True:
            known = cfg.node_id or self._url_node.get(cfg.url)
            if known is not None and known in self.peers:
                await self._wait_gone(NodeID(known))
                continue
            started = time.monotonic()
            try:
                async with connect(
                    cfg.url,
                    proxy=None,
                    ssl=self._tls_client,
                    ssl_handshake_timeout=C.HANDSHAKE_TIMEOUT_S,
                    **_WS_OPTIONS,
                ) as ws:
                    node = await self._handshake(ws, "dialer", cfg.node_id)
                    self._url_node[cfg.url] = node
                    await self._serve_peer(ws, node, dialer=self.identity.node_id)
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
                self.stats["dial_failed"] += 1
                log.debug("dial failed", url=cfg.url, reason=type(exc).__name__)
            except HearthnetError as exc:
                self._handshake_failed(exc, cfg.url)
            if time.monotonic() - started > C.RECONNECT_RESET_AFTER_S:
                delay = C.RECONNECT_BACKOFF_MIN_S
            await asyncio.sleep(delay * (0.5 + random.random()))  # jitter, not a secret
            delay = min(delay * 2, C.RECONNECT_BACKOFF_MAX_S)

    async def _wait_gone(self, node: NodeID) -> None:
        def gone() -> bool:
            return node not in self.peers

        async with self._changed:
            await self._changed.wait_for(gone)

    # --- use ----------------------------------------------------------------------------------

    def _peer(self, node: str) -> PeerConnection:
        peer = self.peers.get(NodeID(node))
        if peer is None or peer.closed.is_set():
            raise HearthnetError(ErrorCode.PEER_NOT_CONNECTED, f"peer {node} is not connected")
        return peer

    async def call_remote(
        self, peer: str, name: str, body: dict[str, Any], timeout: float, blob: bytes | None
    ) -> tuple[dict[str, Any], bytes | None]:
        """Route a bus call to the connected peer `peer`; `peer_not_connected` when it is not."""
        return await self._peer(peer).request(name, body, timeout, blob)

    async def subscribe(
        self, peer: str, prefix: str, after_seq: int | None = None
    ) -> RemoteSubscription:
        """Subscribe to a connected peer's events under `prefix`."""
        return await self._peer(peer).subscribe(prefix, after_seq)

    async def wait_for_peer(self, node: str, timeout: float) -> None:
        """Wait until a session with `node` is up (tests and the CLI use it before calling)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: node in self.peers)

    def peer_info(self) -> list[dict[str, Any]]:
        """The live sessions for `node.status`: who, from where, and which side dialled."""
        return [
            {
                "node_id": p.node_id,
                "remote": _host_port(p.ws.remote_address),
                "dialled_by_us": p.dialer == self.identity.node_id,
            }
            for p in sorted(self.peers.values(), key=lambda p: p.node_id)
        ]


def _host_port(address: Any) -> str:
    """`host:port` (`[host]:port` for IPv6) of a socket address tuple."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)
