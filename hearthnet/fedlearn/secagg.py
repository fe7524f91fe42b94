"""The SecAgg+ protocol steps that need no numbers: who masks with whom, the shares each
participant sends, the unmask request, the reveals that answer it and the secrets recovered
from them (docs/architecture.md, "Secure rounds"). The masking arithmetic is
`aggregation/secure.py`.

Steps, after the mask roster (U1) closes:
1. each roster member seals Shamir shares of its self-mask seed and mask key for each of its
   neighbours (`make_bundle`); the coordinator logs the signed bundles and closes the share
   phase with the set U2 of members that sent theirs;
2. each member masks its update with its self mask and the pairwise masks of its neighbours in
   U2, and submits;
3. the coordinator asks (`Unmask`) with U3 = the members of U2 that submitted and the rest of
   U2 as dropped; each member answers once per round (`reveal`) with, per neighbour, the share
   of its self-mask seed if it survived or of its mask key if it dropped, never both;
4. the coordinator recovers each survivor's seed and each dropped member's key (`recover_all`,
   checked against the announced commitment and public key) and removes the masks.

Pure: no I/O, no torch or numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from hearthnet import constants as C
from hearthnet.canonical import canonical_bytes, canonical_sha256
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn import secagg_graph, shares
from hearthnet.fedlearn.manifest import RoundManifest
from hearthnet.fedlearn.masks import MaskingKey, MaskKeyAnnouncement, commitment, x25519_public
from hearthnet.fedlearn.shares import Reveal, ShareBundle
from hearthnet.identity import NodeID, NodeIdentity, verify

UNMASK_PURPOSE = "hearthnet.fedlearn.unmask/1"
CONFIRM_PURPOSE = "hearthnet.fedlearn.unmask-confirm/1"

_Names = Annotated[
    list[Annotated[str, Field(max_length=128)]], Field(max_length=C.FEDLEARN_MAX_PARTICIPANTS)
]


class UnmaskRequest(BaseModel):
    """The coordinator's unmask request: which members of U2 survived (their masked updates are
    summed) and which dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    round_id: Annotated[str, Field(min_length=26, max_length=26)]
    survivors: _Names
    dropped: _Names

    @property
    def sha(self) -> str:
        """What a reveal names: the request it answers, and the one request a member answers."""
        return canonical_sha256({"purpose": UNMASK_PURPOSE, **self.model_dump()})


@dataclass(frozen=True)
class SecAggRound:
    """A closed roster's public SecAgg+ structure: the announcements (U1), the groups (one per
    bucket; one without buckets), the graph parameters by group size and every member's
    neighbours."""

    round_id: str
    manifest_sha: str
    announcements: Mapping[str, MaskKeyAnnouncement]
    groups: tuple[tuple[str, ...], ...]
    params_of: Mapping[int, secagg_graph.GraphParams]
    neighbours: Mapping[str, tuple[str, ...]]

    @classmethod
    def build(
        cls,
        manifest: RoundManifest,
        manifest_sha: str,
        announcements: Mapping[str, MaskKeyAnnouncement],
        groups: Sequence[Sequence[str]] | None = None,
    ) -> SecAggRound:
        """The structure everyone derives from the same roster (`manifest_invalid` if the
        declared fractions cannot hold for it)."""
        roster = sorted(announcements)
        seed = secagg_graph.graph_seed(manifest_sha, roster)
        size = manifest.secure_bucket_size
        if groups is None:
            groups = secagg_graph.buckets(seed, roster, size) if size >= 2 else [roster]
        parts = tuple(tuple(sorted(g)) for g in groups)
        minimum = 2 if size >= 2 else 3
        params_of = {
            len(g): secagg_graph.derive(
                len(g), manifest.secagg_dropout, manifest.secagg_corruption, minimum
            )
            for g in parts
        }
        return cls(
            manifest.round_id,
            manifest_sha,
            dict(announcements),
            parts,
            params_of,
            secagg_graph.neighbours(seed, parts, params_of),
        )

    def graph(self) -> list[dict[str, int]]:
        """Per group: its size, degree and threshold (what the roster event records)."""
        return [
            {
                "size": len(g),
                "degree": self.params_of[len(g)].degree,
                "threshold": self.params_of[len(g)].threshold,
            }
            for g in self.groups
        ]

    def group_of(self, participant: str) -> tuple[str, ...]:
        """The group (bucket) a participant masks within."""
        for g in self.groups:
            if participant in g:
                return g
        raise HearthnetError(ErrorCode.DELTA_INVALID, "not in the mask roster")

    def threshold(self, participant: str) -> int:
        """How many shares recover one of `participant`'s secrets."""
        return self.params_of[len(self.group_of(participant))].threshold

    def x_of(self, owner: str, holder: str) -> int:
        """The Shamir x-coordinate of the share `owner` gave `holder` (its neighbour)."""
        return self.neighbours[owner].index(holder) + 1


# --- step 1: shares ---------------------------------------------------------------------------


def make_bundle(identity: NodeIdentity, key: MaskingKey, plan: SecAggRound) -> ShareBundle:
    """This node's shares for its neighbours, sealed for each and signed."""
    me = identity.node_id
    near = plan.neighbours[me]
    t = plan.threshold(me)
    self_shares = shares.split(key.self_seed, t, len(near))
    key_shares = shares.split(key.mask_secret(), t, len(near))
    rid = plan.round_id
    sealed = {
        peer: shares.seal(
            key.share_private,
            plan.announcements[peer].share_key,
            rid,
            me,
            peer,
            self_shares[i],
            key_shares[i],
        )
        for i, peer in enumerate(near)
    }
    commitments = {
        peer: shares.commit(rid, me, peer, "self", self_shares[i])
        + shares.commit(rid, me, peer, "key", key_shares[i])
        for i, peer in enumerate(near)
    }
    return ShareBundle.create(identity, rid, plan.manifest_sha, sealed, commitments)


def check_bundle(plan: SecAggRound, caller: str, bundle: ShareBundle) -> None:
    """A roster member's own signed bundle for this round, with one share per neighbour and no
    other: the coordinator's check before logging it, a member's before using it."""
    if bundle.sender != caller or caller not in plan.announcements:
        raise HearthnetError(ErrorCode.FORBIDDEN, "shares come from a mask roster member")
    if bundle.round_id != plan.round_id or bundle.manifest_sha != plan.manifest_sha:
        raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "shares are for another round")
    near = set(plan.neighbours[caller])
    if set(bundle.shares) != near or set(bundle.commitments) != near:
        raise HearthnetError(
            ErrorCode.DELTA_INVALID, "a share bundle holds one share per neighbour, no other"
        )
    bundle.verify()


# --- step 3: unmask and reveal ---------------------------------------------------------------


def unmask_request(
    plan: SecAggRound, shared: Sequence[str], submitted: Sequence[str]
) -> UnmaskRequest:
    """The coordinator's request: U3 = the members of U2 that submitted, less every group
    (bucket) that cannot be unmasked without revealing one update: a lone survivor, a dropped
    member whose mask key too few surviving neighbours could rebuild, or a survivor whose seed
    they could not. Those survivors are listed
    as dropped; their vectors are left out of the sum and their self masks stay secret."""
    alive = set(shared) & set(submitted)
    in_u2 = set(shared)
    for group in plan.groups:
        members = [p for p in group if p in in_u2]
        here = [p for p in members if p in alive]
        dead = [p for p in members if p not in alive]

        alive_near = {p: sum(q in alive for q in plan.neighbours[p]) for p in members}
        short = {p for p in members if alive_near[p] < plan.threshold(p)}  # can't be rebuilt
        lost = any(p in short and alive_near[p] > 0 for p in dead)
        lost = lost or (len(here) > 1 and any(p in short for p in here))
        if len(here) == 1 or lost:
            alive -= set(here)
    return UnmaskRequest(
        round_id=plan.round_id, survivors=sorted(alive), dropped=sorted(in_u2 - alive)
    )


def needed_keys(plan: SecAggRound, req: UnmaskRequest) -> list[str]:
    """The dropped members whose mask keys unmasking needs: those with a surviving neighbour."""
    survivors = set(req.survivors)
    return [d for d in req.dropped if survivors & set(plan.neighbours[d])]


def check_unmask(plan: SecAggRound, shared: Sequence[str], req: UnmaskRequest) -> None:
    """What a member checks before it reveals: the request splits exactly U2 into survivors and
    dropped, and every group keeps at least two survivors (or none), so no sum it unlocks is one
    member's update."""
    survivors, dropped = set(req.survivors), set(req.dropped)
    if req.round_id != plan.round_id or survivors & dropped or survivors | dropped != set(shared):
        raise HearthnetError(
            ErrorCode.SIGNATURE_INVALID, "the unmask request does not split the share set"
        )
    if len(survivors) < C.FEDLEARN_SECURE_MIN_PARTICIPANTS:
        raise HearthnetError(
            ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET,
            f"only {len(survivors)} survivors: unmasking would reveal too small a sum",
        )
    for g in plan.groups:
        if len(survivors & set(g)) == 1:
            raise HearthnetError(
                ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET,
                "a bucket has one survivor: unmasking it would reveal that member's update",
            )


def check_own_view(me: str, plan: SecAggRound, req: UnmaskRequest) -> None:
    """What a member checks of the request about itself before it signs it: it is listed as a
    survivor, no more of its neighbours are listed dropped than its secrets' threshold
    tolerates, and at least a threshold of them survive (a request that claims otherwise would
    let the coordinator rebuild its masks)."""
    if me not in req.survivors:
        raise HearthnetError(
            ErrorCode.FEDLEARN_AGGREGATION_FAILED,
            "this node is listed as dropped: it reveals nothing for this request",
        )
    near = set(plan.neighbours[me])
    too_many = (
        len(near & set(req.dropped)) > plan.params_of[len(plan.group_of(me))].tolerated_dropouts
    )
    if too_many or len(near & set(req.survivors)) < plan.threshold(me):
        raise HearthnetError(
            ErrorCode.SIGNATURE_INVALID,
            "the unmask request lists more of this node's neighbours as dropped than may drop "
            "(or too few as survivors to hold its secrets)",
        )


def confirm_bytes(round_id: str, unmask_sha: str) -> bytes:
    """What a member signs: the one unmask request it will reveal for in this round."""
    return canonical_bytes(
        {"purpose": CONFIRM_PURPOSE, "round_id": round_id, "unmask_sha": unmask_sha}
    )


def check_confirmations(req: UnmaskRequest, signatures: Mapping[str, str]) -> None:
    """Every survivor signed this exact request (each member signs one request per round), so
    no two requests with a member in common can both be revealed for: the consistency round
    that stops a coordinator telling members different stories (Bonawitz et al. 2017)."""
    data = confirm_bytes(req.round_id, req.sha)
    for member in req.survivors:
        sig = signatures.get(member)
        if sig is None or not verify(NodeID(member), data, bytes.fromhex(sig)):
            raise HearthnetError(
                ErrorCode.SIGNATURE_INVALID,
                f"the unmask request lacks a valid confirmation by {member[:16]}…",
            )


def reveal(
    me: str,
    key: MaskingKey,
    plan: SecAggRound,
    bundles: Mapping[str, ShareBundle],
    req: UnmaskRequest,
    confirmations: Mapping[str, str],
) -> Reveal:
    """This node's answer: per neighbour in U2, the one share the request calls for; only for a
    request naming it a survivor that every listed survivor signed (`check_confirmations`), so
    no caller can reveal for an unconfirmed or equivocated request."""
    check_own_view(me, plan, req)
    check_confirmations(req, confirmations)
    survivors = set(req.survivors)
    needed = set(needed_keys(plan, req))
    self_out: dict[str, str] = {}
    key_out: dict[str, str] = {}
    for sender in plan.neighbours[me]:
        bundle = bundles.get(sender)
        if bundle is None or (sender not in survivors and sender not in needed):
            continue  # dropped before sending shares, or its key unmasks nothing
        try:
            self_share, key_share = shares.open_sealed(
                key.share_private,
                plan.announcements[sender].share_key,
                plan.round_id,
                sender,
                me,
                bundle.shares[me],
            )
        except HearthnetError:
            continue  # a sender's bad shares are its own loss, never this node's failure
        x = plan.x_of(sender, me).to_bytes(2, "big")
        if self_share[:2] != x or key_share[:2] != x:
            continue
        rid = plan.round_id
        if shares.commit(rid, sender, me, "self", self_share) != bundle.committed(me, "self"):
            continue  # not what the sender committed to: revealing it would be refused
        if shares.commit(rid, sender, me, "key", key_share) != bundle.committed(me, "key"):
            continue
        if sender in survivors:
            self_out[sender] = self_share.hex()
        else:
            key_out[sender] = key_share.hex()
    return Reveal(
        round_id=plan.round_id,
        unmask_sha=req.sha,
        sender=me,
        self_shares=self_out,
        key_shares=key_out,
    )


def check_reveal(
    plan: SecAggRound,
    req: UnmaskRequest,
    caller: str,
    rev: Reveal,
    bundles: Mapping[str, ShareBundle],
) -> None:
    """A reveal from a member of U2 answering this request, with shares only of its neighbours,
    of the kind the request asked for, at the x-coordinate each owner gave it, each the share
    its owner committed to in its signed bundle (so one bad revealer cannot spoil recovery)."""
    survivors, dropped = set(req.survivors), set(needed_keys(plan, req))
    if rev.sender != caller or caller not in survivors:
        raise HearthnetError(ErrorCode.FORBIDDEN, "reveals come from the request's survivors")
    if rev.round_id != plan.round_id or rev.unmask_sha != req.sha:
        raise HearthnetError(ErrorCode.BAD_REQUEST, "the reveal answers another unmask request")
    near = set(plan.neighbours[caller])
    for owners, kind in ((rev.self_shares, survivors), (rev.key_shares, dropped)):
        for owner, hexed in owners.items():
            if owner not in near or owner not in kind:
                raise HearthnetError(ErrorCode.DELTA_INVALID, "a share that was not asked for")
            if int(hexed[:4], 16) != plan.x_of(owner, caller):
                raise HearthnetError(ErrorCode.DELTA_INVALID, "a share at the wrong coordinate")
            which = "self" if kind is survivors else "key"
            share = bytes.fromhex(hexed)
            bundle = bundles.get(owner)
            if bundle is None or shares.commit(
                plan.round_id, owner, caller, which, share
            ) != bundle.committed(caller, which):
                raise HearthnetError(
                    ErrorCode.DELTA_INVALID, "a share that is not the one its owner committed to"
                )


# --- step 4: recover ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Unmasked:
    """What removing the masks needs: the structure, the request, every survivor's self-mask
    seed and every dropped member's mask key (raw bytes)."""

    plan: SecAggRound
    request: UnmaskRequest
    self_seeds: Mapping[str, bytes] = field(default_factory=dict)
    mask_keys: Mapping[str, bytes] = field(default_factory=dict)


def _shares_for(reveals: Mapping[str, Reveal], owner: str, self_kind: bool) -> list[bytes]:
    out = []
    for rev in reveals.values():
        pick = rev.self_shares if self_kind else rev.key_shares
        if owner in pick:
            out.append(bytes.fromhex(pick[owner]))
    return out


def ready(plan: SecAggRound, req: UnmaskRequest, reveals: Mapping[str, Reveal]) -> bool:
    """Whether every secret the request needs has its threshold of shares."""
    for owner in req.survivors:
        if len(_shares_for(reveals, owner, True)) < plan.threshold(owner):
            return False
    for owner in needed_keys(plan, req):
        if len(_shares_for(reveals, owner, False)) < plan.threshold(owner):
            return False
    return True


def recover_all(plan: SecAggRound, req: UnmaskRequest, reveals: Mapping[str, Reveal]) -> Unmasked:
    """Every survivor's seed and dropped member's key, each checked against what it announced;
    `fedlearn_aggregation_failed` if one cannot be recovered."""
    anns = plan.announcements

    def seed_ok(owner: str) -> Callable[[bytes], bool]:
        return lambda s: commitment(s) == anns[owner].self_commitment

    def key_ok(owner: str) -> Callable[[bytes], bool]:
        return lambda s: x25519_public(s) == anns[owner].public_key

    seeds = {
        o: shares.recover(_shares_for(reveals, o, True), plan.threshold(o), seed_ok(o))
        for o in req.survivors
    }
    keys = {
        o: shares.recover(_shares_for(reveals, o, False), plan.threshold(o), key_ok(o))
        for o in needed_keys(plan, req)
    }
    return Unmasked(plan, req, seeds, keys)
