"""What a connection may cost the node, before and after its peer is authenticated.

`FrameLimits` sits in websockets' frame parser: small messages and few pings until the peer's
auth verifies, then the normal frame and control-message limits (see its docstring for why the
parser, not the handshake task, raises them). `SummaryLog` turns floods of refusals or failed
handshakes into one log line per interval, and `AcceptErrors` does the same for accept() failing
when descriptors run out. `address_group` is the unit per-address caps count.
Importing this module also lowers websockets' HTTP parser limits, which apply before any cap.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import websockets.http11
from websockets.exceptions import ProtocolError
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol

from hearthnet import constants as C
from hearthnet.bus.handshake import verify_auth
from hearthnet.bus.protocol import Auth, Hello, decode
from hearthnet.logs import get_logger

log = get_logger("hearthnet.transport")

# The HTTP upgrade request is read before any cap applies (websockets calls process_request
# once it is complete): keep what one such request can make the node hold small. websockets
# reads these module limits at parse time; this process's only websockets user is this module.
websockets.http11.MAX_NUM_HEADERS = C.HTTP_MAX_HEADERS
websockets.http11.MAX_LINE_LENGTH = C.HTTP_MAX_LINE_BYTES


class FrameLimits:
    """Receive limits of one connection, applied by websockets' parser between frames.

    The parser fixes a frame's size limit before reading the frame, so raising it from the
    handshake task would race the peer's first frame after the handshake. Instead the peer's
    `auth` (its second message) is verified here as the parser hands it over, and the limits are
    raised before the next frame's header is read. After the handshake a frame is at most
    WS_MAX_FRAME_BYTES and a text (control) message at most CONTROL_FRAME_MAX_BYTES across its
    fragments, both refused from the header of the frame that would exceed them (close 1009)."""

    def __init__(self, protocol: Protocol, write_backlog: Callable[[], int]) -> None:
        self._protocol = protocol
        self._write_backlog = write_backlog
        self._pings = 0  # pings before the handshake completed
        self._recv_frame = protocol.recv_frame
        protocol.recv_frame = self._on_frame  # type: ignore[method-assign]
        protocol.max_message_size = C.HANDSHAKE_MAX_MESSAGE_BYTES
        protocol.max_fragment_size = None
        self._messages = 0  # text messages received before the handshake completed
        self._early: bytes | None = None  # their auth, when it came before we could check it
        self._expect: tuple[Hello, bytes] | None = None
        self.opened = False

    def expect_auth(self, theirs: Hello, data: bytes) -> None:
        """Check their auth over `data` as soon as it arrives (now, if it already has)."""
        self._expect = (theirs, data)
        if self._early is not None:
            self._check(self._early)
            self._early = None

    def open(self) -> None:
        """Normal limits: for an authenticated peer only."""
        self.opened = True
        self._protocol.max_message_size = C.WS_MAX_MESSAGE_BYTES
        self._protocol.max_fragment_size = C.WS_MAX_FRAME_BYTES

    def _check(self, raw: bytes) -> None:
        assert self._expect is not None
        theirs, data = self._expect
        self._expect = None
        try:
            auth = decode(raw.decode())
            if isinstance(auth, Auth):
                verify_auth(theirs, data, auth)
                self.open()
        except Exception:  # the handshake task checks it again and reports why
            return

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.PING:
            # Every ping queues a pong; a peer that pings and never reads would grow our send
            # buffer without bound (pings are not messages: no message limit applies).
            self._pings += not self.opened
            if self._pings > C.HANDSHAKE_MAX_PINGS:
                raise ProtocolError("too many pings before the handshake")
            if self._write_backlog() > C.WS_PING_BACKLOG_LIMIT_BYTES:
                raise ProtocolError("pings while our pongs are not being read")
        self._recv_frame(frame)
        if self.opened:
            if frame.opcode is Opcode.TEXT and not frame.fin:
                self._protocol.max_message_size = C.CONTROL_FRAME_MAX_BYTES
            elif frame.opcode is Opcode.CONT and frame.fin:
                self._protocol.max_message_size = C.WS_MAX_MESSAGE_BYTES
            return
        if frame.fin and frame.opcode in (Opcode.TEXT, Opcode.CONT):
            self._messages += 1
            if self._messages == 2 and frame.opcode is Opcode.TEXT:
                if self._expect is not None:
                    self._check(bytes(frame.data))
                else:
                    self._early = bytes(frame.data)


class SummaryLog:
    """One log line per interval for refused connections or failed handshakes, however many
    there are: the first at once (with where it came from), then counts by reason."""

    def __init__(self, event: str = "connections refused") -> None:
        self._event = event
        self._last = -float("inf")
        self._counts: Counter[str] = Counter()

    def refused(self, reason: str, **context: str) -> None:
        """Count one refusal; log a line only when the interval since the last one has passed."""
        self._counts[reason] += 1
        now = time.monotonic()
        if now - self._last >= C.CONNECTION_REFUSAL_LOG_INTERVAL_S:
            self._last = now
            log.warning(
                self._event,
                counts=dict(self._counts),
                interval_s=C.CONNECTION_REFUSAL_LOG_INTERVAL_S,
                **context,
            )
            self._counts.clear()


class AcceptErrors:
    """Out of descriptors, asyncio logs a traceback for every failed accept() (CPython 3.11
    keeps retrying up to the backlog each tick: thousands of lines a second under a socket
    flood). For this transport's listening sockets, count them and log one line per interval;
    everything else goes to the handler that was there before."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sockets: Iterable[Any], stats: Counter[str]
    ):
        self._loop, self._stats = loop, stats
        self._fds = {s.fileno() for s in sockets}
        self._summary = SummaryLog("accept failed (out of descriptors or memory); backing off")
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        sock, exc = context.get("socket"), context.get("exception")
        if (
            isinstance(exc, OSError)
            and str(context.get("message", "")).startswith("socket.accept()")
            and sock is not None
            and sock.fileno() in self._fds
        ):
            self._stats["accept_failed"] += 1
            self._summary.refused(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def close(self) -> None:
        """Put back the event loop's previous exception handler."""
        if self._loop.get_exception_handler() == self._handle:
            self._loop.set_exception_handler(self._previous)


def address_group(address: Any) -> str:
    """The unit the per-address caps count: the host of a socket address, an IPv6 host by its
    /64 (one subscriber line usually holds a whole /64, so single addresses cost nothing)."""
    host = str(address[0]) if isinstance(address, tuple) and address else str(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        return str(mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
