"""Fair shares of a bounded resource among untrusted peers (README "The substrate").

A peer may hold up to `per_peer` units. Its first `guaranteed` units come from a reserve sized
for `reserved_peers` peers; the rest come from a shared pool of `shared` units. One peer, or a
few, can exhaust the shared pool but never the reserve, so every other peer (up to
`reserved_peers` of them) still gets its guaranteed units; the total never exceeds
reserve + shared. Throwaway identities beyond `reserved_peers` compete for the shared pool.
"""

from __future__ import annotations

from collections import Counter


class FairShare:
    """A pool shared by peers: each is guaranteed a floor (for the first `reserved_peers`), and may
    borrow from a shared part up to a per-peer cap, so one peer cannot use up what others need."""

    def __init__(self, per_peer: int, guaranteed: int, reserved_peers: int, shared: int):
        if not 0 <= guaranteed <= per_peer:
            raise ValueError("guaranteed must be between 0 and per_peer")
        self.per_peer = per_peer
        self.guaranteed = guaranteed
        self.reserve = guaranteed * reserved_peers
        self.shared = shared
        self._held: Counter[str] = Counter()
        self._floor = 0  # Σ min(held, guaranteed) over peers
        self.total = 0

    @property
    def capacity(self) -> int:
        """Units in the pool: the reserved floors plus the shared part."""
        return self.reserve + self.shared

    def held(self, peer: str) -> int:
        """Units `peer` holds now."""
        return self._held.get(peer, 0)

    def _shared_used(self) -> int:
        """Units beyond the reserve: floors that borrowed once the reserve ran out count here."""
        return self.total - min(self._floor, self.reserve)

    def try_acquire(self, peer: str) -> str | None:
        """Take one unit for `peer`; None when granted, else why not (for the error message)."""
        held = self.held(peer)
        if held >= self.per_peer:
            return f"this peer already holds its maximum of {self.per_peer}"
        in_floor = held < self.guaranteed
        if not (in_floor and self._floor < self.reserve) and self._shared_used() >= self.shared:
            return (
                f"the shared pool of {self.shared} is in use by other peers; this peer holds "
                f"{held} (each peer is guaranteed {self.guaranteed})"
            )
        self._held[peer] = held + 1
        self._floor += in_floor
        self.total += 1
        return None

    def release(self, peer: str) -> None:
        """Give one of `peer`'s units back (a no-op when it holds none)."""
        held = self.held(peer)
        if held <= 0:
            return
        if held == 1:
            del self._held[peer]
        else:
            self._held[peer] = held - 1
        self._floor -= held <= self.guaranteed
        self.total -= 1
