"""Security events that a flood cannot turn into a disk flood.

Bad input from a peer is worth an event in the node's log — who, what, how often — but an
append is an fsync, and a hostile peer can send thousands of bad objects a second. So per
(event type, peer) the first event of an interval is written at once; later ones in the same
interval are only counted, and the count rides on that peer's next written event
(`suppressed`: how many were folded into it since the previous one). A flood therefore costs at
most one event per peer per interval; the structured log gets the same one line. The table of
peers is bounded (the oldest entry is forgotten first), so many throwaway identities cost
bounded memory too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hearthnet import constants as C
from hearthnet.eventlog.store import EventLog
from hearthnet.logs import get_logger

log = get_logger("hearthnet.security")


@dataclass
class _Window:
    started: float
    suppressed: int = 0


class SecurityEvents:
    """Writes security events (bad input from a peer) with at most one per peer and type per
    interval; `total` counts every occurrence for `node.status`."""

    def __init__(
        self,
        eventlog: EventLog,
        interval_s: float = C.SECURITY_EVENT_INTERVAL_S,
        max_peers: int = C.SECURITY_EVENT_MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.eventlog = eventlog
        self.interval_s = interval_s
        self.max_peers = max_peers
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self.total: dict[str, int] = {}  # event type -> every occurrence, written or folded

    async def record(self, event_type: str, peer: str, payload: dict[str, Any]) -> bool:
        """Count one occurrence; write it unless this peer already had one this interval.
        Returns whether an event was written."""
        self.total[event_type] = self.total.get(event_type, 0) + 1
        key = (event_type, peer)
        now = self.clock()
        window = self._windows.get(key)
        if window is not None and now - window.started < self.interval_s:
            window.suppressed += 1
            return False
        folded = window.suppressed if window is not None else 0
        self._windows.pop(key, None)
        self._windows[key] = _Window(now)
        while len(self._windows) > self.max_peers:
            del self._windows[next(iter(self._windows))]  # the oldest
        await self.eventlog.append(event_type, {**payload, "peer": peer, "suppressed": folded})
        log.warning(event_type, peer=peer, suppressed=folded, **payload)
        return True
