"""One authenticated connection to a peer: requests both ways, blobs, event subscriptions.

Created only after the handshake verified, so everything here knows the peer's NodeID. Every
queue and wait is bounded: in-flight requests per peer, pending calls, subscriptions, event
queues. Requests in flight and subscriptions are fair shares of node-wide pools
(hearthnet/fairshare.py), so no peer can use up another's. Bad input from the peer is answered
with an error where it can be, counted and logged with its NodeID; after PEER_MAX_PROTOCOL_ERRORS
refused frames (malformed, oversized, too many JSON values, or requests answered `bad_request` or
`payload_too_large`) the connection is closed. Other peers and the node are unaffected.

The framing rules (a blob follows its announcement, which frames are refused, the count, request
ids) are `hearthnet/bus/framing.py`, with no I/O; this module feeds it the socket's frames and
carries out what it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from hearthnet import constants as C
from hearthnet.bus.bus import CallContext, CapabilityBus
from hearthnet.bus.feeds import serve_feed
from hearthnet.bus.framing import Disconnect, Framing, FramingEvent, Received, Refused, blob_ref
from hearthnet.bus.protocol import (
    BlobRef,
    EventMsg,
    Message,
    Request,
    Response,
    Subscribe,
    Unsubscribe,
    _Msg,
)
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event, EventLog
from hearthnet.eventlog.event import from_wire
from hearthnet.identity import NodeID
from hearthnet.logs import get_logger
from hearthnet.tasks import Spawner

log = get_logger("hearthnet.peer")

EventPolicy = Callable[[NodeID, Event], bool]
# Answers to a peer's request that mean its input was refused: they count toward disconnecting
# it. `unknown_capability`, `overloaded` and the like do not: honest peers meet them too.
_REFUSED_INPUT = (ErrorCode.BAD_REQUEST, ErrorCode.PAYLOAD_TOO_LARGE)


async def _sha256(data: bytes) -> str:
    """Large blobs are hashed off the event loop (hashlib releases the GIL)."""
    if len(data) < C.BLOB_FRAGMENT_BYTES:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


async def _join(received: Received) -> bytes | None:
    """A received blob as one bytes object; copying a large one runs off the event loop."""
    if received.blob_size < C.BLOB_FRAGMENT_BYTES:
        return received.join()
    return await asyncio.to_thread(received.join)


class RemoteSubscription:
    """Events from a peer's log, each verified against the peer's NodeID before it is yielded."""

    def __init__(self, peer: PeerConnection, sub_id: int, prefix: str):
        self.peer_id = peer.node_id
        self.prefix = prefix
        self._peer = peer
        self._id = sub_id
        self._queue: asyncio.Queue[Event | HearthnetError | None] = asyncio.Queue(
            C.EVENTLOG_SUBSCRIBER_QUEUE_MAX
        )

    def _deliver(self, item: Event | HearthnetError | None) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._peer._subs_out.pop(self._id, None)
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            self._queue.put_nowait(
                HearthnetError(ErrorCode.SUBSCRIPTION_OVERFLOW, "remote subscriber fell behind")
            )

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, HearthnetError):
            raise item
        return item

    async def close(self) -> None:
        """Tell the peer to stop the feed and end iteration here."""
        if self._peer._subs_out.pop(self._id, None) is not None:
            with contextlib.suppress(ConnectionClosed, HearthnetError):
                await self._peer._send(Unsubscribe(t="unsub", id=self._id))
        self._deliver(None)


class PeerConnection:
    """One authenticated session with a peer: requests and blobs both ways, event feeds.

    The transport creates it after the handshake and runs `run` until the socket closes."""

    def __init__(
        self,
        ws: Connection,
        node_id: NodeID,
        dialer: NodeID,
        bus: CapabilityBus,
        eventlog: EventLog | None,
        policy: EventPolicy,
        stats: Counter[str],
        max_blob: int = C.BLOB_MAX_BYTES,
    ):
        self.ws = ws
        self.node_id = node_id
        self.dialer = dialer
        self.stats = stats
        self._bus = bus
        self._log = eventlog
        self._policy = policy
        self._framing = Framing(max_blob)
        self._send_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], bytes | None]]] = {}
        self._tasks = Spawner(f"peer {node_id}")
        self._subs_in: dict[int, asyncio.Task[None]] = {}
        self._subs_out: dict[int, RemoteSubscription] = {}
        self.closed = asyncio.Event()

    # --- sending ------------------------------------------------------------------------------

    async def _send(self, msg: _Msg, blob: bytes | None = None) -> None:
        """A message and its blob leave back to back: no other frame can come between. The
        blob goes as one message in BLOB_FRAGMENT_BYTES frames, so the receiver can hash it as
        it arrives."""
        text, fragments = self._framing.frames(msg, blob)
        async with self._send_lock:
            await self.ws.send(text)
            if fragments is not None:
                await self.ws.send(fragments)

    @staticmethod
    async def _ref(blob: bytes | None) -> BlobRef | None:
        return None if blob is None else blob_ref(blob, await _sha256(blob))

    async def request(
        self, cap: str, body: dict[str, Any], timeout: float, blob: bytes | None
    ) -> tuple[dict[str, Any], bytes | None]:
        """Call `cap` on the peer and wait for its answer; bounded by the pending-call cap and
        `timeout`."""
        if self.closed.is_set():
            raise HearthnetError(ErrorCode.PEER_NOT_CONNECTED, f"peer {self.node_id} disconnected")
        if blob is not None and len(blob) > self._framing.max_blob:  # before hashing it
            raise HearthnetError(ErrorCode.PAYLOAD_TOO_LARGE, "blob exceeds the transport limit")
        req = self._framing.request(cap, body, timeout, await self._ref(blob))
        req_id = req.id
        future: asyncio.Future[tuple[dict[str, Any], bytes | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[req_id] = future
        try:
            await self._send(req, blob)
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise HearthnetError(
                ErrorCode.TIMEOUT, f"{cap} on {self.node_id} timed out after {timeout}s"
            ) from None
        except ConnectionClosed:
            raise HearthnetError(
                ErrorCode.PEER_NOT_CONNECTED, f"peer {self.node_id} disconnected"
            ) from None
        finally:
            self._pending.pop(req_id, None)
            self._framing.settled(req_id)

    async def subscribe(self, prefix: str, after_seq: int | None = None) -> RemoteSubscription:
        """Follow the peer's events under `prefix` (the backlog after `after_seq`, then live)."""
        if len(self._subs_out) >= C.MAX_SUBSCRIPTIONS_PER_PEER:
            raise HearthnetError(ErrorCode.OVERLOADED, "too many subscriptions to this peer")
        sub_id = self._framing.next_id()
        sub = RemoteSubscription(self, sub_id, prefix)
        self._subs_out[sub_id] = sub
        await self._send(Subscribe(t="sub", id=sub_id, prefix=prefix, after_seq=after_seq))
        return sub

    # --- receiving ----------------------------------------------------------------------------

    def _log_refused(self, kind: str, message: str) -> None:
        self.stats[kind] += 1
        log.warning("bad input from peer", peer=self.node_id, kind=kind, reason=message[:200])

    async def _bad(self, kind: str, message: str) -> None:
        """Refuse input the framing could not judge (a duplicate subscription, an invalid
        event): counted like a refused frame."""
        self._log_refused(kind, message)
        if self._framing.strike():
            await self._disconnect()

    async def _disconnect(self) -> None:
        if not self.closed.is_set():
            log.warning("closing peer after repeated bad input", peer=self.node_id)
        await self.ws.close(1008, "too many refused frames")

    async def run(self) -> None:
        """Read frames until the connection closes; then fail everything waiting on it."""
        try:
            await self._read_loop()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(
                        HearthnetError(ErrorCode.PEER_NOT_CONNECTED, f"peer {self.node_id} left")
                    )
            self._tasks.cancel()
            for task in self._subs_in.values():
                task.cancel()
            for sub in list(self._subs_out.values()):
                sub._deliver(None)
            self._subs_out.clear()

    async def _read_loop(self) -> None:
        """Feed each message's fragments to the framing as they arrive and act on what it
        finds, until it says to disconnect."""
        framing = self._framing
        while not framing.closing:
            async for part in self.ws.recv_streaming():
                if not await self._act(framing.receive_fragment(part)):
                    return
            if not await self._act(framing.end_message()):
                return

    async def _act(self, events: list[FramingEvent]) -> bool:
        """Carry out the framing's events; False once the connection is being closed."""
        for event in events:
            if isinstance(event, Received):
                await self._handle(event.msg, await _join(event))
            elif isinstance(event, Refused):
                self._log_refused(event.kind, event.reason)
                if event.answer is not None and event.error is not None:
                    await self._fail(event.answer, event.error)
            elif isinstance(event, Disconnect):
                await self._disconnect()
                return False
        return True

    async def _fail(self, msg: Request | Response, err: HearthnetError) -> None:
        if isinstance(msg, Request):
            await self._send(Response(t="res", id=msg.id, ok=False, error=err.to_dict()))
        else:
            future = self._pending.get(msg.id)
            if future is not None and not future.done():
                future.set_exception(err)

    async def _handle(self, msg: Message, blob: bytes | None) -> None:
        if isinstance(msg, Request):
            # taken at admission, before the task gets to run; released when it ends
            why = self._bus.remote_calls.try_acquire(self.node_id)
            if why is not None:
                self.stats["overloaded"] += 1
                await self._fail(
                    msg,
                    HearthnetError(
                        ErrorCode.OVERLOADED, f"too many requests in flight: {why}; retry later"
                    ),
                )
                return
            self._tasks.spawn(self._serve(msg, blob), f"serve {msg.cap} #{msg.id}")
        elif isinstance(msg, Response):
            future = self._pending.get(msg.id)
            if future is None or future.done():
                return  # a late answer to a call that timed out
            if msg.ok:
                future.set_result((msg.body or {}, blob))
            else:
                future.set_exception(HearthnetError.from_dict(msg.error))
        elif isinstance(msg, Subscribe):
            await self._start_feed(msg)
        elif isinstance(msg, Unsubscribe):
            task = self._subs_in.pop(msg.id, None)
            if task is not None:
                task.cancel()
        elif isinstance(msg, EventMsg):
            await self._receive_event(msg)
        # hello/auth after the handshake are refused by the framing

    async def _serve(self, req: Request, blob: bytes | None) -> None:
        refused = False
        try:
            ctx = CallContext(caller=self.node_id, local=False, blob=blob)
            try:
                async with asyncio.timeout(min(req.timeout, C.CALL_TIMEOUT_MAX_S)):
                    body, out_blob = await self._bus.dispatch(req.cap, req.body, ctx)
                response = Response(
                    t="res", id=req.id, ok=True, body=body, blob=await self._ref(out_blob)
                )
            except TimeoutError:
                err = HearthnetError(ErrorCode.TIMEOUT, f"{req.cap} timed out")
                response, out_blob = (
                    Response(t="res", id=req.id, ok=False, error=err.to_dict()),
                    None,
                )
            except HearthnetError as exc:
                if exc.code in (ErrorCode.UNKNOWN_CAPABILITY, ErrorCode.BAD_REQUEST):
                    self.stats[exc.code.value] += 1
                refused = exc.code in _REFUSED_INPUT  # counts like a malformed frame
                response, out_blob = (
                    Response(t="res", id=req.id, ok=False, error=exc.to_dict()),
                    None,
                )
            with contextlib.suppress(ConnectionClosed):
                await self._send(response, out_blob)
                if refused and self._framing.strike():
                    await self._disconnect()
        finally:
            self._bus.remote_calls.release(self.node_id)

    # --- event feeds --------------------------------------------------------------------------

    async def _start_feed(self, sub: Subscribe) -> None:
        """Admit a subscription or answer why not (`subscription_overflow` when this peer is
        over its fair share) — never silence."""
        try:
            if self._log is None:
                raise HearthnetError(ErrorCode.OVERLOADED, "this node keeps no event log")
            if sub.id in self._subs_in:
                await self._bad("duplicate_subscription", f"subscription id {sub.id} is in use")
                raise HearthnetError(ErrorCode.BAD_REQUEST, f"subscription id {sub.id} is in use")
            # first, so nothing falls between backlog and live; the store enforces fair shares
            live = self._log.subscribe(sub.prefix, peer=self.node_id)
        except HearthnetError as err:
            if err.code is ErrorCode.SUBSCRIPTION_OVERFLOW:
                self.stats["subscription_refused"] += 1
            await self._send(EventMsg(t="evt", sub=sub.id, error=err.to_dict()))
            return
        feed = serve_feed(self._send, self._policy, self.node_id, sub, self._log, live)
        task = self._tasks.spawn(feed, f"feed {sub.prefix!r} #{sub.id}")
        self._subs_in[sub.id] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._subs_in.get(sub.id) is finished:  # not a later one reusing the id
                del self._subs_in[sub.id]
            live.close()  # also when the task was cancelled before it ran

        task.add_done_callback(done)

    async def _receive_event(self, msg: EventMsg) -> None:
        sub = self._subs_out.get(msg.sub)
        if sub is None:
            return
        if msg.event is None:
            self._subs_out.pop(msg.sub, None)
            sub._deliver(HearthnetError.from_dict(msg.error) if msg.error else None)
            return
        try:
            sub._deliver(from_wire(msg.event, self.node_id))
        except HearthnetError as exc:
            await self._bad("event_invalid", exc.message)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket; `run` then fails whatever still waits on this peer."""
        await self.ws.close(code, reason)
