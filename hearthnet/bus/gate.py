"""Connection caps applied at TCP accept, before TLS costs anything.

asyncio's TLS layer allocates a 256 KiB buffer for every connection it wraps, and a TLS
handshake, an HTTP upgrade and the hello/auth exchange all come before the peer is known. So the
listener takes plain TCP and `GatedConnection` decides at accept, from the remote address alone,
whether to go on: within the caps it starts TLS itself (`loop.start_tls`) and only then hands the
encrypted transport to websockets; beyond them it aborts the socket at once (no TLS, no HTTP).
`ConnectionGate` is the counting, with no I/O.

A connection counts toward the inbound caps (total, per address) from accept until it closes,
and toward the handshake caps (total, per address) until its hello/auth handshake completes or
fails. An IPv6 address counts by its /64 (`limits.address_group`). Beyond the per-address caps a
connection is refused; when the node-wide handshake places are all taken, the oldest handshake
in flight is cut instead, so stalled handshakes from many addresses cannot lock honest dialers
out: an honest handshake takes milliseconds and is cut only if the places turn over faster.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from websockets.asyncio.server import ServerConnection

from hearthnet import constants as C
from hearthnet.bus.limits import SummaryLog, address_group


class ConnectionGate:
    """Counts inbound connections and handshakes in flight, per address and in all."""

    def __init__(self) -> None:
        self.connections: Counter[str] = Counter()
        self.handshakes: Counter[str] = Counter()
        self.inflight: dict[Any, str] = {}  # connection -> address, oldest first
        self.live: set[Any] = set()  # the admitted connections, for status and tests
        self.refusals = SummaryLog()

    @property
    def total(self) -> int:
        """Inbound connections open now, from accept until close."""
        return sum(self.connections.values())

    def refusal(self, address: str) -> str | None:
        """Why a new connection from `address` is refused, or None to admit it."""
        if self.total >= C.MAX_INBOUND_CONNECTIONS:
            return "too many connections"
        if self.connections[address] >= C.MAX_CONNECTIONS_PER_ADDRESS:
            return "too many connections from one address"
        if self.handshakes[address] >= C.MAX_HANDSHAKES_PER_ADDRESS:
            return "too many handshakes in flight from one address"
        return None

    def admit(self, address: str, conn: Any) -> Any | None:
        """Count `conn`, accepted from `address`: open, and in its handshake. Returns the oldest
        handshake in flight, already uncounted, when the node-wide places were all taken: the
        caller cuts it."""
        evicted = None
        if len(self.inflight) >= C.MAX_HANDSHAKES_IN_FLIGHT:
            evicted = next(iter(self.inflight))
            self.handshake_done(evicted)
        self.connections[address] += 1
        self.handshakes[address] += 1
        self.inflight[conn] = address
        return evicted

    def handshake_done(self, conn: Any) -> None:
        """The handshake of `conn` ended (either way, or it was cut); a no-op the second time."""
        address = self.inflight.pop(conn, None)
        if address is not None:
            _decrement(self.handshakes, address)

    def closed(self, address: str) -> None:
        """A connection from `address` closed; once per `admit`."""
        _decrement(self.connections, address)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


@dataclass(frozen=True)
class Listener:
    """What the connections of one listening transport share, and how they report: a refusal
    at accept (`on_refused(reason)`) and a TLS handshake that failed or timed out
    (`on_tls_failed(exc, address)`), both on the event loop, so they must not block."""

    gate: ConnectionGate
    tls: ssl.SSLContext
    on_refused: Callable[[str], None]
    on_tls_failed: Callable[[BaseException, str], None]


class GatedConnection(ServerConnection):
    """A websockets server connection that is admitted by a `ConnectionGate` at TCP accept and
    encrypts itself before websockets sees a byte. `gated()` makes a subclass per listener."""

    listener: ClassVar[Listener]

    address: str = ""
    _state: str = "new"
    _early: bytearray  # new → tls → open (websockets owns it) → released | refused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """TCP accepted: refuse it (abort, no TLS) if over the gate's caps, else count it and
        start TLS with reading paused, so nothing reaches websockets unencrypted."""
        raw = cast(asyncio.Transport, transport)
        self.address = address_group(raw.get_extra_info("peername"))
        reason = self.listener.gate.refusal(self.address)
        if reason is not None:
            self._state = "refused"
            self.listener.on_refused(reason)
            raw.abort()
            return
        evicted = self.listener.gate.admit(self.address, self)
        if evicted is not None:
            self.listener.on_refused("oldest handshake cut: all handshake places taken")
            evicted.cut()
        self.listener.gate.live.add(self)
        self._state = "tls"
        self._early = bytearray()
        self._raw = raw
        raw.pause_reading()  # nothing reaches websockets unencrypted
        self.connection_lost_waiter.add_done_callback(lambda _: self._release())
        self._tls_task = asyncio.get_running_loop().create_task(self._start_tls(raw))

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            encrypted = await loop.start_tls(
                raw,
                self,
                self.listener.tls,
                server_side=True,
                ssl_handshake_timeout=C.HANDSHAKE_TIMEOUT_S,
            )
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
            raw.abort()
            self.listener.on_tls_failed(exc, self.address)
            self._release()
            return
        if encrypted is None or raw.is_closing():
            raw.abort()
            self._release()
            return
        self._state = "open"
        super().connection_made(encrypted)
        early, self._early = self._early, bytearray()
        if early:
            super().data_received(bytes(early))

    def handshake_finished(self) -> None:
        """The hello/auth handshake succeeded or failed: no longer a handshake in flight."""
        self.listener.gate.handshake_done(self)
        if self._state == "open":
            self._state = "session"

    def cut(self) -> None:
        """Abort a handshake still in flight (the gate needs its place for a newer one)."""
        if self._state == "tls":
            self._raw.abort()  # start_tls fails and releases the rest
        elif self._state == "open":
            self.transport.abort()

    def _release(self) -> None:
        self.listener.gate.handshake_done(self)
        if self._state in ("tls", "open", "session"):
            self.listener.gate.closed(self.address)
            self.listener.gate.live.discard(self)
            self._state = "released"

    def data_received(self, data: bytes) -> None:
        """Decrypted bytes: to websockets once TLS is up, kept (bounded) while it completes."""
        if self._state in ("open", "session"):
            super().data_received(data)
        elif self._state == "tls":
            # Decrypted bytes can arrive in the same read that finishes the TLS handshake,
            # before start_tls returns the transport: keep them (bounded) for websockets.
            self._early += data
            if len(self._early) > C.HANDSHAKE_MAX_MESSAGE_BYTES * 4:
                self._raw.abort()  # start_tls then fails and releases the counts

    def eof_received(self) -> None:
        """The peer closed its side: websockets hears of it only once it owns the connection."""
        if self._state in ("open", "session"):
            super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is gone: websockets releases the counts through its close waiter once it
        owns the connection; before that the gate's counts are released here."""
        if self._state in ("open", "session"):
            super().connection_lost(exc)
        else:
            self._release()


def gated(
    gate: ConnectionGate,
    tls: ssl.SSLContext,
    on_refused: Callable[[str], None],
    on_tls_failed: Callable[[BaseException, str], None],
) -> type[GatedConnection]:
    """A `GatedConnection` class bound to one listener's gate and TLS context (websockets'
    `create_connection` takes a class)."""
    listener = Listener(gate, tls, on_refused, on_tls_failed)
    return type("ListenerConnection", (GatedConnection,), {"listener": listener})
