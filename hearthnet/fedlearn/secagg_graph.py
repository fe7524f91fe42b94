"""SecAgg+ parameters and the public neighbour graph (docs/architecture.md, "Secure rounds").

Each participant shares its secrets with, and masks against, only its `degree` neighbours in a
random graph that everyone derives from public values (the manifest SHA and the mask roster), so
the cost per participant grows with the degree, not with n (Bell et al. 2020). The graph is a
Harary graph over a seeded permutation: each node's neighbours are the `degree / 2` nodes on
either side of it on a ring. A small roster gets the complete graph.

The threshold t is at least a strict majority of a node's neighbours: the coordinator gets t
shares of a participant's self-mask seed only from neighbours told it survived, and t shares of
its mask key only from neighbours told it dropped; honest neighbours answer one unmask request
per round (the one every survivor signed, `secagg.check_confirmations`), so both together need
2t − degree corrupt neighbours answering twice, and t is raised until 2t − degree exceeds the
corrupt neighbours the manifest declares (`secagg_corruption`). The degree is the
smallest that, for the manifest's declared drop-out fraction δ and corruption fraction γ, keeps
P[some node has more than degree − t neighbours drop] ≤ 2^-20 and P[some node has 2t − degree
or more corrupt neighbours] ≤ 2^-40 (binomial tails, union bound over the n nodes: hence the log n
growth); where no sparse degree does, the complete graph with the exact counts
⌊δ·n⌋ ≤ degree − t and ⌊γ·n⌋ < 2t − degree is used, and a roster those cannot hold is refused.

Pure Python; no torch or numpy.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from hearthnet.errors import ErrorCode, HearthnetError

CORRECTNESS_BITS = 20  # a node's secrets stay recoverable except with probability 2^-20
SECURITY_BITS = 40  # corrupt neighbours reach the threshold with probability at most 2^-40


@dataclass(frozen=True)
class GraphParams:
    """The neighbour graph's size, degree and share threshold for one roster."""

    n: int
    degree: int
    threshold: int

    @property
    def complete(self) -> bool:
        """Whether every participant neighbours every other."""
        return self.degree == self.n - 1

    @property
    def tolerated_dropouts(self) -> int:
        """Neighbours of one node that may drop while its secrets stay recoverable."""
        return self.degree - self.threshold


def _tail_at_least(k: int, p: float, m: int) -> float:
    """P[Binomial(k, p) ≥ m]."""
    if m <= 0:
        return 1.0
    if m > k or p <= 0.0:
        return 0.0
    return sum(math.comb(k, i) * p**i * (1.0 - p) ** (k - i) for i in range(m, k + 1))


def derive(n: int, dropout: float, corruption: float, minimum: int = 3) -> GraphParams:
    """The smallest degree (and its majority threshold) that holds for `n` participants with the
    declared drop-out and corruption fractions; `manifest_invalid` if even the complete graph
    cannot, saying which manifest field to lower. A bucket (`minimum` 2) is a complete graph
    whose drop-outs exclude the bucket instead (`secagg.unmask_request`)."""
    if n < minimum:
        raise HearthnetError(
            ErrorCode.MANIFEST_INVALID, f"secure aggregation needs at least {minimum} participants"
        )
    if minimum < 3:
        return GraphParams(n, n - 1, (n - 1) // 2 + 1)
    for k in range(2, n - 1, 2):
        # the smallest majority t whose 2t − k exceeds the corrupt neighbours w.h.p.
        t = next(
            (
                t
                for t in range(k // 2 + 1, k + 1)
                if n * _tail_at_least(k, corruption, 2 * t - k) <= 2.0**-SECURITY_BITS
            ),
            None,
        )
        if t is not None and n * _tail_at_least(k, dropout, k - t + 1) <= 2.0**-CORRECTNESS_BITS:
            return GraphParams(n, k, t)
    k = n - 1
    corrupt = math.floor(corruption * n)
    t = max(k // 2 + 1, (k + corrupt) // 2 + 1)
    if math.floor(dropout * n) > k - t:
        raise HearthnetError(
            ErrorCode.MANIFEST_INVALID,
            f"{n} participants cannot tolerate secagg_dropout={dropout:g} with "
            f"secagg_corruption={corruption:g}: the threshold is {t} of {k} neighbours, so at "
            f"most {k - t} may drop; lower secagg_dropout (--secagg-dropout) or "
            "secagg_corruption (--secagg-corruption), or raise min_participants "
            "(--min-participants): larger rosters tolerate more",
        )
    return GraphParams(n, k, t)


def graph_seed(manifest_sha: str, roster: Sequence[str]) -> bytes:
    """The public seed of a round's graph: the manifest and the closed mask roster."""
    h = hashlib.sha256(b"hearthnet/fedlearn/secagg-graph/v1\0" + bytes.fromhex(manifest_sha))
    for p in sorted(roster):
        h.update(b"\0" + p.encode())
    return h.digest()


def buckets(seed: bytes, roster: Sequence[str], size: int) -> list[list[str]]:
    """The roster split into buckets of `size` (the last one takes the remainder, so sizes are
    size..2·size−1) in the order SHA-256 of the seed and NodeID gives: public, so every member
    can check its bucket, and fixed only once the roster is."""
    order = sorted(roster, key=lambda p: hashlib.sha256(b"bucket\0" + seed + p.encode()).digest())
    count = max(1, len(order) // size)
    out = [order[i * size : (i + 1) * size] for i in range(count)]
    out[-1] += order[count * size :]
    return [sorted(b) for b in out]


def neighbours(
    seed: bytes, groups: Sequence[Sequence[str]], params_of: dict[int, GraphParams]
) -> dict[str, tuple[str, ...]]:
    """Every participant's sorted neighbours. Each group (one per bucket; one for a round
    without buckets) gets its own Harary graph of the degree `params_of[len(group)]`, ordered by
    SHA-256 of the seed and the NodeID, so nothing links participants of different groups."""
    out: dict[str, tuple[str, ...]] = {}
    for group in groups:
        order = sorted(group, key=lambda p: hashlib.sha256(seed + p.encode()).digest())
        n = len(order)
        params = params_of[n]
        if params.complete:
            for p in order:
                out[p] = tuple(sorted(q for q in order if q != p))
            continue
        half = params.degree // 2
        for i, p in enumerate(order):
            near = {order[(i + d) % n] for d in range(-half, half + 1) if d != 0}
            out[p] = tuple(sorted(near))
    return out
