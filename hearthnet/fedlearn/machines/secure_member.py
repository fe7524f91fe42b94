"""The secure-round steps of a participant's machine (SecAgg+, docs/architecture.md "Secure
rounds"): keys, roster, shares, masking over the share set, the one signed unmask request and
the reveal. A mixin of `ParticipantMachine` (the state is the machine's: its `member` fold and
the secrets it keeps in memory); pure, like the machine.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn import events as ev
from hearthnet.fedlearn.machines.effects import Append, Call, SetTimer
from hearthnet.fedlearn.machines.member_effects import (
    ROSTER_TIMER,
    UNMASK_TIMER,
    MakeShares,
    NewMaskKey,
    ParticipantEffect,
    Submit,
    Train,
    Wait,
)
from hearthnet.fedlearn.machines.results import Suspect, check_mask_holders
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.masks import MaskingKey, MaskKeyAnnouncement, check_roster
from hearthnet.fedlearn.secagg import (
    SecAggRound,
    check_bundle,
    check_own_view,
    check_unmask,
    confirm_bytes,
)
from hearthnet.fedlearn.secagg import reveal as secagg_reveal
from hearthnet.fedlearn.shares import ShareBundle
from hearthnet.fedlearn.state import Membership, Stage
from hearthnet.identity import NodeIdentity

CAP = C.FEDLEARN_CAP_PREFIX
SECURE_EVENTS = (ev.MaskKey, ev.Roster, ev.Shares, ev.SharesClosed, ev.Unmask, ev.Confirmed)


class SecureSteps:
    """The secure half of `ParticipantMachine`."""

    identity: NodeIdentity
    me: str
    member: Membership
    trust_roster: set[str]
    key: MaskingKey | None
    announced: bool
    anns: dict[str, MaskKeyAnnouncement]
    refused: HearthnetError | None
    shares_sent: bool
    _plan: SecAggRound | None
    _answered: int
    _revealed_for: int
    _progress: int
    _waiting_from: int

    @property
    def signed(self) -> SignedManifest:
        """The round's signed manifest."""
        return self.member.signed

    @property
    def round_id(self) -> str:
        """The round's ID."""
        return self.member.round_id

    def _append(self, suffix: str, payload: ev.Payload) -> Append:
        self.member.check(suffix)
        return Append(ev.member_event_type(suffix), payload)

    def _wait(self, name: str | None, at: datetime | None) -> SetTimer | Wait:
        """Wait for the coordinator's next event (`settled`), until `at` if given."""
        self._waiting_from = self._progress
        return Wait() if name is None or at is None else SetTimer(name, at)

    def keyed(self, key: MaskingKey) -> None:
        """The round secrets `NewMaskKey` made (sealed to disk first), or those a restarted node
        unsealed."""
        self.key = key
        self.announced = False

    def _next_secure(self) -> list[ParticipantEffect]:
        """A secure round: keys, roster, shares before training; the share set before masking;
        the one reveal after submitting (docs/architecture.md, "Secure rounds")."""
        m = self.member
        # the roster and share set must be in by the deadline; the grace lets a restarted node
        # re-learn them from the coordinator's events before it gives up
        deadline = self.signed.manifest.deadline_at + timedelta(seconds=C.FEDLEARN_TAKEOVER_GRACE_S)
        if self.refused is not None:
            raise self.refused
        if self.key is None:
            if m.roster is not None or m.bundle is not None or m.stage is not Stage.JOINED:
                raise HearthnetError(
                    ErrorCode.FEDLEARN_AGGREGATION_FAILED,
                    "this node's round secrets were lost (restart without its sealed secrets "
                    "file) after the mask roster closed",
                )
            return [NewMaskKey(self.round_id)]
        if m.roster is None:
            if not self.announced:
                return [self._announce(), self._wait(ROSTER_TIMER, deadline)]
            return [self._wait(ROSTER_TIMER, deadline)]
        if m.bundle is None:
            return [MakeShares(self.round_id, self.plan())]
        if not self.shares_sent:
            return [self._send_shares(m.bundle)]
        if m.unmask is not None and self._answered < m.unmask_count:
            return self._confirm() or [self._wait(None, None)]
        if m.confirmations is not None and self._revealed_for < m.confirm_count:
            return self._reveal() or [self._wait(None, None)]
        if m.stage is Stage.JOINED:
            return [Train(self.round_id)]
        if m.stage is Stage.TRAINED:
            if m.shared is None:
                return [self._wait(ROSTER_TIMER, deadline)]
            assert m.trained_sha is not None
            return [Submit(self.round_id, m.trained_sha, self.key, self.plan(), m.shared)]
        if m.unmask is None:  # a secure round has no takeover: give up if never unmasked
            grace = timedelta(seconds=2 * C.FEDLEARN_SECURE_REVEAL_S)
            return [self._wait(UNMASK_TIMER, deadline + grace)]
        return [self._wait(None, None)]

    def plan(self) -> SecAggRound:
        """The closed roster's SecAgg+ structure, derived once."""
        assert self.member.roster is not None
        if self._plan is None:
            self._plan = SecAggRound.build(
                self.signed.manifest, self.signed.manifest_sha, self.member.roster
            )
        return self._plan

    def shares_made(self, bundle: ShareBundle) -> list[Append]:
        """The bundle `MakeShares` sealed: recorded before it is sent, so a restart resends it."""
        payload = ev.MemberShared(round_id=self.round_id, bundle=bundle)
        return [self._append("shared", payload)]

    def _send_shares(self, bundle: ShareBundle) -> Call:
        return Call(
            "shares",
            self.signed.manifest.coordinator,
            CAP + "round.shares",
            {"bundle": bundle.model_dump()},
            retry_until=self.signed.manifest.deadline_at,
        )

    def _confirm(self) -> list[ParticipantEffect]:
        """Sign the unmask request, the only one this node signs in the round (recorded first);
        a different request later is refused as the coordinator's attempt to tell members
        different stories. Listed as dropped itself: nothing to sign or reveal."""
        m = self.member
        assert m.unmask is not None and m.shared is not None
        req = m.unmask
        self._answered = m.unmask_count
        if m.revealed_sha is not None and m.revealed_sha != req.sha:
            err = HearthnetError(
                ErrorCode.SIGNATURE_INVALID,
                "the coordinator asked for a second, different unmask: refused",
            )
            raise Suspect(self.signed.manifest.coordinator, "unmask", err)
        plan = self.plan()
        check_unmask(plan, m.shared, req)
        if self.me not in req.survivors:
            return []  # its vector is left out; its neighbours' shares are not its to give
        check_own_view(self.me, plan, req)
        out: list[ParticipantEffect] = []
        if m.revealed_sha is None:
            payload = ev.MemberRevealed(round_id=self.round_id, unmask_sha=req.sha)
            out.append(self._append("revealed", payload))
        signature = self.identity.sign(confirm_bytes(self.round_id, req.sha)).hex()
        body = {"round_id": self.round_id, "unmask_sha": req.sha, "signature": signature}
        out.append(self._reveal_call("confirm", "round.confirm", body))
        return out

    def _reveal_call(self, name: str, capability: str, body: dict[str, Any]) -> Call:
        return Call(
            name,
            self.signed.manifest.coordinator,
            CAP + capability,
            body,
            retry_until=self.signed.manifest.deadline_at
            + timedelta(seconds=C.FEDLEARN_SECURE_REVEAL_S),
        )

    def _reveal(self) -> list[ParticipantEffect]:
        """Reveal for the request this node signed, once every survivor signed it too."""
        m = self.member
        assert m.unmask is not None and m.shared is not None and self.key is not None
        assert m.confirmations is not None
        req = m.unmask
        self._revealed_for = m.confirm_count
        if m.revealed_sha != req.sha:
            return []
        bundles = {p: b for p, b in m.bundles.items() if p in set(m.shared)}
        rev = secagg_reveal(self.me, self.key, self.plan(), bundles, req, m.confirmations)
        return [self._reveal_call("reveal", "round.reveal", {"reveal": rev.model_dump()})]

    def _announce(self) -> Call:
        """This node's signed mask-key announcement, to the coordinator."""
        assert self.key is not None and self.member.num_samples is not None
        ann = self.key.announce(
            self.identity, self.round_id, self.signed.manifest_sha, self.member.num_samples
        )
        return Call(
            "mask_key",
            self.signed.manifest.coordinator,
            CAP + "round.mask_key",
            {"announcement": ann.model_dump()},
            retry_until=self.signed.manifest.deadline_at,
        )

    def observe_secure(self, event: ev.Payload) -> None:
        """One of the coordinator's secure-round events (keys, roster, shares, unmask)."""
        m = self.member
        if isinstance(event, ev.MaskKey):
            self.anns[event.announcement.participant] = event.announcement
        elif isinstance(event, ev.Roster):
            self._roster(event.participants)
            if (
                event.graph is not None
                and m.roster is not None
                and event.graph != self.plan().graph()
            ):
                self.refused = HearthnetError(  # this node masks over no other graph
                    ErrorCode.PROTOCOL_ERROR, "the roster's graph is not the one its members derive"
                )
        elif isinstance(event, ev.Shares) and m.roster is not None:
            check_bundle(self.plan(), event.bundle.sender, event.bundle)
            m.bundles[event.bundle.sender] = event.bundle
        elif isinstance(event, ev.SharesClosed):
            if not set(event.participants) <= set(m.bundles):
                raise HearthnetError(ErrorCode.PROTOCOL_ERROR, "share set names unknown bundles")
            m.shared = list(event.participants)
        elif isinstance(event, ev.Unmask):
            m.unmask = event.request
            m.unmask_count += 1
        elif (
            isinstance(event, ev.Confirmed)
            and m.unmask is not None
            and event.unmask_sha == m.unmask.sha
        ):
            m.confirmations = dict(event.signatures)
            m.confirm_count += 1

    def _roster(self, names: list[str]) -> None:
        roster = {p: self.anns[p] for p in names if p in self.anns}
        check_roster(roster, self.signed.manifest, self.signed.manifest_sha)
        if len(roster) != len(names):
            raise HearthnetError(ErrorCode.PROTOCOL_ERROR, "roster names unknown mask keys")
        try:
            self.check_mask_holders(set(roster))
        except HearthnetError as err:  # keep following (the result may still come)
            self.refused = err
        else:
            self.member.roster = roster

    def check_mask_holders(self, holders: set[str]) -> None:
        """Refuse a mask roster with a key of an outsider or of a node that never joined."""
        check_mask_holders(self.me, self.trust_roster, self.member.participants, holders)
