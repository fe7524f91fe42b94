"""FairShare: a few peers can fill the shared pool, never the others' guaranteed share."""

import random

import pytest

from hearthnet.fairshare import FairShare


def test_greedy_peers_fill_only_the_shared_pool():
    share = FairShare(per_peer=8, guaranteed=2, reserved_peers=4, shared=12)
    assert share.capacity == 20
    # Two greedy peers: 8 each = 2 reserved + 6 shared each, which fills the shared pool.
    for peer in ("g1", "g2"):
        for _ in range(8):
            assert share.try_acquire(peer) is None
    why = share.try_acquire("g1")
    assert why is not None and "maximum of 8" in why
    # A newcomer still gets its guaranteed 2, then a clear refusal.
    assert share.try_acquire("new") is None
    assert share.try_acquire("new") is None
    why = share.try_acquire("new")
    assert why is not None and "shared pool of 12" in why and "holds 2" in why
    # Releasing a shared unit lets the next one in.
    share.release("g1")
    assert share.try_acquire("new") is None
    assert share.total == 8 + 7 + 3


def test_floors_borrow_from_the_shared_pool_once_the_reserve_is_used():
    share = FairShare(per_peer=4, guaranteed=1, reserved_peers=2, shared=2)
    for peer in ("a", "b", "c", "d"):  # two reserved floors, then two borrowed ones
        assert share.try_acquire(peer) is None
    assert share.try_acquire("e") is not None
    assert share.try_acquire("a") is not None  # the shared pool holds c's and d's floors
    share.release("c")
    assert share.try_acquire("a") is None
    assert share.total == share.capacity


def test_never_exceeds_capacity_or_per_peer_under_random_use():
    rng = random.Random(13)
    share = FairShare(per_peer=5, guaranteed=2, reserved_peers=3, shared=7)
    held: dict[str, int] = {}
    for _ in range(20_000):
        peer = f"p{rng.randrange(8)}"
        if rng.random() < 0.55:
            if share.try_acquire(peer) is None:
                held[peer] = held.get(peer, 0) + 1
        elif held.get(peer):
            share.release(peer)
            held[peer] -= 1
        assert share.total == sum(held.values()) <= share.capacity
        assert all(n <= 5 and share.held(p) == n for p, n in held.items())
        # Whoever holds less than its guarantee is refused only when both pools are in use.
        floors = sum(min(n, 2) for n in held.values())
        for p in (f"p{i}" for i in range(8)):
            if held.get(p, 0) < 2 and floors < share.reserve:
                assert share.try_acquire(p) is None
                share.release(p)


def test_release_of_nothing_is_harmless_and_bad_shapes_are_refused():
    share = FairShare(per_peer=2, guaranteed=1, reserved_peers=1, shared=1)
    share.release("nobody")
    assert share.total == 0 and share.held("nobody") == 0
    with pytest.raises(ValueError):
        FairShare(per_peer=1, guaranteed=2, reserved_peers=1, shared=1)
    assert share.capacity == 2
