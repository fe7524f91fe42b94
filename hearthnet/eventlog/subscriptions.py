"""Live fan-out of appended events: bounded per-subscriber queues, and who may hold how many.

The node's own readers are capped at EVENTLOG_MAX_LOCAL_SUBSCRIBERS; peers draw on fair shares
(constants MAX_SUBSCRIPTIONS_PER_PEER and below), so none can use up the others'."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from hearthnet.constants import (
    EVENTLOG_MAX_LOCAL_SUBSCRIBERS,
    EVENTLOG_SUBSCRIBER_QUEUE_MAX,
    FAIR_SHARE_RESERVED_PEERS,
    MAX_SUBSCRIPTIONS_PER_PEER,
    SUBSCRIPTIONS_GUARANTEED_PER_PEER,
    SUBSCRIPTIONS_SHARED,
)
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog.event import Event
from hearthnet.fairshare import FairShare


class Subscription:
    """Live events whose type starts with a prefix, from the moment of subscribing.

    Bounded: a subscriber that falls more than EVENTLOG_SUBSCRIBER_QUEUE_MAX events behind gets
    `subscription_overflow` (with the last seq it saw) and can catch up with `read(after_seq)`.
    """

    def __init__(self, owner: Subscribers, type_prefix: str, peer: str | None = None):
        self.type_prefix = type_prefix
        self.peer = peer  # the remote subscriber it is held for; None for the node itself
        self._owner = owner
        self._closed = False
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(EVENTLOG_SUBSCRIBER_QUEUE_MAX)
        self._overflowed = False
        self.last_seq = 0

    def _offer(self, event: Event) -> None:
        if self._overflowed or not event.type.startswith(self.type_prefix):
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._overflowed = True

    def _end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    def close(self) -> None:
        """Stop receiving and give the subscription's fair-share unit back."""
        if not self._closed:
            self._closed = True
            self._owner.release(self)
        self._end()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._overflowed and self._queue.empty():
            self.close()
            raise HearthnetError(
                ErrorCode.SUBSCRIPTION_OVERFLOW,
                "subscriber fell too far behind; catch up with read(after_seq)",
                {"last_seq": self.last_seq},
            )
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        self.last_seq = event.seq
        return event


class Subscribers:
    """The open subscriptions of one log and the caps on taking more."""

    def __init__(self) -> None:
        self._open: set[Subscription] = set()
        self._local = 0
        self.remote = FairShare(
            MAX_SUBSCRIPTIONS_PER_PEER,
            SUBSCRIPTIONS_GUARANTEED_PER_PEER,
            FAIR_SHARE_RESERVED_PEERS,
            SUBSCRIPTIONS_SHARED,
        )

    def subscribe(self, type_prefix: str, peer: str | None) -> Subscription:
        """A new subscription, or `subscription_overflow` saying which cap refused it."""
        if peer is None:
            if self._local >= EVENTLOG_MAX_LOCAL_SUBSCRIBERS:
                raise HearthnetError(
                    ErrorCode.SUBSCRIPTION_OVERFLOW,
                    f"this node already has {EVENTLOG_MAX_LOCAL_SUBSCRIBERS} local event "
                    "readers; stop some (e.g. `hearthnet events --follow`) and retry",
                )
            self._local += 1
        elif (why := self.remote.try_acquire(peer)) is not None:
            raise HearthnetError(
                ErrorCode.SUBSCRIPTION_OVERFLOW,
                f"subscription refused: {why}; close subscriptions to this node or retry later",
                {"held": self.remote.held(peer)},
            )
        sub = Subscription(self, type_prefix, peer)
        self._open.add(sub)
        return sub

    def release(self, sub: Subscription) -> None:
        """Forget a closed subscription and give its unit back."""
        self._open.discard(sub)
        if sub.peer is None:
            self._local -= 1
        else:
            self.remote.release(sub.peer)

    def offer(self, event: Event) -> None:
        """Hand a committed event to every subscription whose prefix it matches."""
        for sub in list(self._open):
            sub._offer(event)

    def close_all(self) -> None:
        """End every subscription (the log is closing)."""
        for sub in list(self._open):
            sub.close()
