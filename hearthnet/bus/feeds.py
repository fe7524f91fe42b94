"""Serving one event subscription to a peer: the backlog it asked for, then live events.

Kept apart from `PeerConnection` (which admits the subscription and owns the task) because it
is the one long-running loop a session runs per subscription.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from websockets.exceptions import ConnectionClosed

from hearthnet.bus.protocol import EventMsg, Subscribe, _Msg
from hearthnet.errors import HearthnetError
from hearthnet.eventlog import Event, EventLog
from hearthnet.eventlog.event import to_wire
from hearthnet.eventlog.store import Subscription
from hearthnet.identity import NodeID


async def serve_feed(
    send: Callable[[_Msg], Awaitable[None]],
    policy: Callable[[NodeID, Event], bool],
    peer: NodeID,
    sub: Subscribe,
    eventlog: EventLog,
    live: Subscription,
) -> None:
    """Backlog after `after_seq` (if asked), then live events; `policy` decides, per
    subscriber and event, what it may see. Ends with a final frame: the error, or none."""
    error: HearthnetError | None = None
    try:
        last = 0
        if sub.after_seq is not None:
            after = sub.after_seq
            while page := await eventlog.read(after, type_prefix=sub.prefix or None):
                for event in page:
                    if policy(peer, event):
                        await send(EventMsg(t="evt", sub=sub.id, event=to_wire(event)))
                after = last = page[-1].seq
        async for event in live:
            if event.seq > last and policy(peer, event):
                await send(EventMsg(t="evt", sub=sub.id, event=to_wire(event)))
    except HearthnetError as exc:
        error = exc
    except ConnectionClosed:
        return
    finally:
        live.close()
    with contextlib.suppress(ConnectionClosed):
        await send(EventMsg(t="evt", sub=sub.id, error=error.to_dict() if error else None))
