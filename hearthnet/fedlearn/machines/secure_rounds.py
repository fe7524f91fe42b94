"""A coordinator's secure rounds (SecAgg+, docs/architecture.md "Secure rounds"): the mask
roster, the share phase, the unmask request, the consistency round and the reveals. Pure like
the rest of the coordinator (`machines/coordinator.py` owns the rounds and delegates here);
what it holds in memory only — the derived graphs, the survivors' signatures and the reveals
(secret shares, never logged) — a restarted node rebuilds by asking again.
"""

from __future__ import annotations

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn import events as ev
from hearthnet.fedlearn import secagg
from hearthnet.fedlearn.machines import effects as fx
from hearthnet.fedlearn.machines.admission import check_mask_key, roster_to_close
from hearthnet.fedlearn.masks import MaskKeyAnnouncement
from hearthnet.fedlearn.shares import Reveal, ShareBundle
from hearthnet.fedlearn.state import Phase, RoundRecord
from hearthnet.identity import NodeID, verify


class SecureRounds:
    """The secure steps of every round a coordinator runs, over the `RoundRecord`s it passes."""

    def __init__(self) -> None:
        self._plans: dict[str, secagg.SecAggRound] = {}
        self.reveals: dict[str, dict[str, Reveal]] = {}
        self.confirms: dict[str, dict[str, str]] = {}  # survivors' signatures on the request
        self._requested: set[str] = set()

    def accept_mask_key(
        self, record: RoundRecord, caller: str, ann: MaskKeyAnnouncement
    ) -> list[fx.Effect]:
        """A joined participant's mask key for a secure round (idempotent)."""
        if not check_mask_key(record, caller, ann):
            return []  # announced before: the same key again
        return [fx.round_append("mask_key", ev.MaskKey(round_id=ann.round_id, announcement=ann))]

    def maybe_close_roster(self, record: RoundRecord, timer: bool) -> list[fx.Effect]:
        """Close the roster once every place is taken, or at the roster timer with at least
        `min_participants` keys."""
        participants = roster_to_close(record, timer)
        if participants is None:
            return []
        n = len(participants)
        plan = secagg.SecAggRound.build(
            record.signed.manifest,
            record.signed.manifest_sha,
            {p: record.masks[p] for p in participants},
        )
        self._plans[record.round_id] = plan  # the graph every later step uses
        payload = ev.Roster(round_id=record.round_id, participants=participants, graph=plan.graph())
        return [
            fx.round_append("roster", payload),
            fx.Log(
                "info",
                "mask roster closed",
                {"round_id": record.round_id, "participants": n, "graph": plan.graph()},
            ),
        ]

    def secagg_plan(self, record: RoundRecord) -> secagg.SecAggRound:
        """The closed roster's SecAgg+ structure (graph, thresholds), derived once."""
        plan = self._plans.get(record.round_id)
        if plan is None:
            assert record.roster is not None
            roster = {p: record.masks[p] for p in record.roster}
            plan = secagg.SecAggRound.build(
                record.signed.manifest, record.signed.manifest_sha, roster
            )
            self._plans[record.round_id] = plan
        return plan

    def accept_shares(
        self, record: RoundRecord, caller: str, bundle: ShareBundle
    ) -> list[fx.Effect]:
        """A roster member's signed share bundle while the share phase is open (idempotent)."""
        if not record.signed.manifest.secure or record.roster is None:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "the round has no closed mask roster")
        secagg.check_bundle(self.secagg_plan(record), caller, bundle)
        if caller in record.bundles:
            if record.bundles[caller] != bundle:
                raise HearthnetError(ErrorCode.BAD_REQUEST, "shares were already sent")
            return []
        if record.shared is not None or record.phase is not Phase.ANNOUNCED:
            raise HearthnetError(ErrorCode.ROUND_CLOSED, "the share phase is closed")
        return [fx.round_append("shares", ev.Shares(round_id=record.round_id, bundle=bundle))]

    def maybe_close_shares(self, record: RoundRecord, timer: bool) -> list[fx.Effect]:
        """Close the share phase once every roster member sent its shares, or at its timer."""
        if record.roster is None or record.shared is not None:
            return []
        if not timer and set(record.bundles) != set(record.roster):
            return []
        shared = sorted(record.bundles)
        return [
            fx.round_append(
                "shares_closed", ev.SharesClosed(round_id=record.round_id, participants=shared)
            ),
            fx.Log(
                "info",
                "share phase closed",
                {"round_id": record.round_id, "participants": len(shared)},
            ),
        ]

    def accept_confirm(
        self, record: RoundRecord, caller: str, unmask_sha: str, signature: str
    ) -> list[fx.Effect]:
        """A survivor's signature on the unmask request; once every survivor's is in, the
        `confirmed` event that lets members reveal."""
        round_id = record.round_id
        req = record.unmask
        if record.phase is not Phase.UNMASKING or req is None:
            raise HearthnetError(ErrorCode.ROUND_CLOSED, "the round is not unmasking")
        if unmask_sha != req.sha or caller not in req.survivors:
            raise HearthnetError(ErrorCode.FORBIDDEN, "confirmations come from listed survivors")
        if not verify(
            NodeID(caller), secagg.confirm_bytes(round_id, req.sha), bytes.fromhex(signature)
        ):
            raise HearthnetError(
                ErrorCode.SIGNATURE_INVALID, "the confirmation is not the caller's"
            )
        held = self.confirms.setdefault(round_id, {})
        if caller in held:
            return []
        held[caller] = signature
        if set(held) != set(req.survivors):
            return []
        payload = ev.Confirmed(round_id=round_id, unmask_sha=req.sha, signatures=dict(held))
        return [fx.round_append("confirmed", payload)]

    def accept_reveal(self, record: RoundRecord, caller: str, rev: Reveal) -> bool:
        """A survivor's reveal for the open unmask request (the same one again: no change); True
        once every secret the request needs can be recovered."""
        if record.phase is not Phase.UNMASKING or record.unmask is None:
            raise HearthnetError(ErrorCode.ROUND_CLOSED, "the round is not unmasking")
        plan = self.secagg_plan(record)
        secagg.check_reveal(plan, record.unmask, caller, rev, record.bundles)
        held = self.reveals.setdefault(rev.round_id, {})
        if caller in held and held[caller] != rev:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "a reveal was already sent")
        held[caller] = rev
        return self.reveals_ready(record)

    def reveals_ready(self, record: RoundRecord) -> bool:
        """Whether the reveals in hand recover every secret the unmask request needs."""
        if record.unmask is None:
            return False
        held = self.reveals.get(record.round_id, {})
        return secagg.ready(self.secagg_plan(record), record.unmask, held)

    def unmasking(self, record: RoundRecord) -> bool:
        """A secure round waiting for reveals."""
        return record.phase is Phase.UNMASKING and not self.reveals_ready(record)

    def requested(self, record: RoundRecord) -> bool:
        """Whether this start has logged the round's unmask request (a restart repeats it)."""
        return record.round_id in self._requested

    def recover(self, record: RoundRecord) -> secagg.Unmasked:
        """Every secret the unmask request needs, from the reveals in hand."""
        assert record.unmask is not None
        held = self.reveals.get(record.round_id, {})
        return secagg.recover_all(self.secagg_plan(record), record.unmask, held)

    def unmask(self, record: RoundRecord) -> list[fx.Effect]:
        """The unmask request (again, unchanged, after a restart), or nothing when the
        survivors are too few to reveal a sum of (the round then aborts at `plan`)."""
        rid = record.round_id
        req = record.unmask
        if req is None:
            assert record.shared is not None
            plan = self.secagg_plan(record)
            req = secagg.unmask_request(plan, record.shared, list(record.submissions))
            try:
                secagg.check_unmask(plan, record.shared, req)
            except HearthnetError:
                return [fx.round_append("aggregating", ev.RoundOnly(round_id=rid))]
        self._requested.add(rid)
        self.confirms.pop(rid, None)  # a repeated request is confirmed anew
        return [
            fx.round_append("unmask", ev.Unmask(round_id=rid, request=req)),
            fx.Log(
                "info",
                "unmask requested",
                {"round_id": rid, "survivors": len(req.survivors), "dropped": len(req.dropped)},
            ),
        ]
