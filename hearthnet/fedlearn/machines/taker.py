"""Taking over a round whose coordinator is gone, as a pure machine (docs/architecture.md,
"Federated rounds").

Once the deadline plus a grace period has passed and the coordinator is unreachable, the round's
participants take over in a deterministic preference order (SHA-256 of round id and NodeID),
each waiting a stagger longer than the one before, so normally one node does it. The taker
gathers the other participants' signed submissions and receipts (`handover`), checks each, and
runs the coordinator's own finalize (`machines/finalize.py`) over them, signing the result as
itself with `takeover=True`: the same submissions give the coordinator's adapter SHA. A
participant hands its submission over only after the deadline, while it cannot reach the
coordinator itself, and only to a node holding a valid receipt for the round.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from hearthnet import constants as C
from hearthnet.config import NodeConfig
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.run import check_payload
from hearthnet.fedlearn.lora import ModelShapes
from hearthnet.fedlearn.machines import effects as fx
from hearthnet.fedlearn.machines import finalize
from hearthnet.fedlearn.masks import MaskKeyAnnouncement
from hearthnet.fedlearn.protocol import HandoverResponse, JoinReceipt, RoundResult, SignedDoc
from hearthnet.fedlearn.publish import Aggregate
from hearthnet.fedlearn.state import TERMINAL_STAGES, Membership, Submitted
from hearthnet.identity import NodeIdentity

GRACE = "takeover-grace:"
TURN = "takeover:"
HANDOVER = C.FEDLEARN_CAP_PREFIX + "round.handover"
RESULT = C.FEDLEARN_CAP_PREFIX + "round.result"


def preference(round_id: str, participants: set[str]) -> list[str]:
    """The order in which participants take over a round: the same on every node."""
    return sorted(participants, key=lambda p: hashlib.sha256(f"{round_id}\0{p}".encode()).digest())


@dataclass
class Gathering:
    """One takeover in progress: what has been handed over so far, and who was left out why."""

    round_id: str
    submissions: dict[str, Submitted] = field(default_factory=dict)
    receipts: dict[str, SignedDoc] = field(default_factory=dict)
    masks: dict[str, MaskKeyAnnouncement] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


def check_handed(
    member: Membership,
    resp: HandoverResponse,
    data: bytes,
    peer: str,
    shapes: ModelShapes,
    limit: int,
) -> None:
    """A handed-over submission is `peer`'s own, signed over `data`, under a receipt of the
    round's coordinator, and its payload is what a coordinator would accept. Blocking (the
    payload check parses up to 64 MiB): the driver runs it in a thread."""
    resp.submission.verify(data)
    issued = resp.receipt.open(JoinReceipt, member.signed.manifest.coordinator)
    if (
        resp.submission.participant != peer
        or issued.participant != peer
        or issued.round_id != member.round_id
        or resp.submission.round_id != member.round_id
    ):
        raise HearthnetError(ErrorCode.FORBIDDEN, "handed-over submission is not the peer's")
    check_payload(member.signed, peer, data, shapes, limit)


class TakerMachine:
    """The takeover rules of one node, over the participant's `Membership` of each round."""

    def __init__(self, identity: NodeIdentity, config: NodeConfig):
        self.identity = identity
        self.config = config

    @property
    def node_id(self) -> str:
        """This node's ID (the taker)."""
        return self.identity.node_id

    def _order(self, member: Membership) -> list[str]:
        return preference(member.round_id, member.participants | {self.node_id})

    # --- when -------------------------------------------------------------------------------------

    def watch(self, member: Membership) -> list[fx.Effect]:
        """Start watching a round this node takes part in (not one it coordinates)."""
        m = member.signed.manifest
        if m.coordinator == self.node_id or m.secure:
            return []  # a secure round is unmasked only by its coordinator (docs/decisions.md)
        at = m.deadline_at + timedelta(seconds=C.FEDLEARN_TAKEOVER_GRACE_S)
        return [fx.SetTimer(GRACE + member.round_id, at)]

    def timer(
        self, name: str, member: Membership, now: datetime, coordinator_up: bool
    ) -> list[fx.Effect]:
        """A takeover timer fired: wait for this node's slot in the order (counted once the
        grace period is over, when every member is known), then take over (`Finalize`) unless
        the coordinator is back or has published."""
        rid = member.round_id
        if member.stage in TERMINAL_STAGES:
            return []
        if name.startswith(GRACE):
            slot = self._order(member).index(self.node_id) * C.FEDLEARN_TAKEOVER_STAGGER_S
            return [fx.SetTimer(TURN + rid, now + timedelta(seconds=slot))]
        if not coordinator_up and member.coordinator_phase != "completed":
            return [fx.Finalize(rid)]
        return [fx.SetTimer(TURN + rid, now + timedelta(seconds=C.FEDLEARN_TAKEOVER_STAGGER_S))]

    def takeover_turn(
        self, member: Membership, claimed: RoundResult, now: datetime, coordinator_up: bool
    ) -> bool:
        """A takeover result counts only from a member of the round, after the deadline, once
        that member's slot in the public preference order has come, and while this node cannot
        reach the coordinator either (otherwise the coordinator's result is the one to wait
        for). This node's own takeover is always its own."""
        taker = claimed.aggregator
        if not claimed.takeover:
            return False
        if taker == self.node_id:
            return True
        if taker not in member.participants or coordinator_up:
            return False
        turn = (
            C.FEDLEARN_TAKEOVER_GRACE_S
            + self._order(member).index(taker) * C.FEDLEARN_TAKEOVER_STAGGER_S
            - C.FEDLEARN_CLOCK_SKEW_S
        )
        return (now - member.signed.manifest.deadline_at).total_seconds() >= turn

    # --- the other side: handing over -------------------------------------------------------------

    def handover(
        self,
        member: Membership,
        caller: str,
        receipt: SignedDoc,
        now: datetime,
        coordinator_up: bool,
    ) -> tuple[HandoverResponse, str]:
        """This node's own submission for a taker holding a valid receipt, after the deadline
        and only while the coordinator is unreachable; and the SHA of the blob to send."""
        m = member.signed.manifest
        issued = receipt.open(JoinReceipt, m.coordinator)
        if issued.participant != caller or issued.round_id != member.round_id:
            raise HearthnetError(ErrorCode.FORBIDDEN, "no valid join receipt for this round")
        if now < m.deadline_at or coordinator_up:
            raise HearthnetError(
                ErrorCode.FORBIDDEN, "submissions are handed over only in a takeover"
            )
        if member.submission is None or member.submitted_sha is None or member.receipt is None:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "this node has no submission for the round")
        member.participants.add(caller)
        masks = list((member.roster or {}).values())
        answer = HandoverResponse(submission=member.submission, receipt=member.receipt, masks=masks)
        return answer, member.submitted_sha

    # --- gathering and finalizing -----------------------------------------------------------------

    def begin(
        self, member: Membership, now: datetime, coordinator_up: bool
    ) -> tuple[SignedDoc | None, Gathering | None, list[fx.Effect]]:
        """Start a takeover: the result if the round has one; else a gathering holding this
        node's own submission and the handover calls to make to every other member."""
        if member.result is not None:
            return member.result, None, []
        if member.receipt is None:
            raise HearthnetError(
                ErrorCode.FORBIDDEN, "only a participant of the round can take over"
            )
        if now < member.signed.manifest.deadline_at:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "a takeover waits for the deadline")
        if coordinator_up:
            raise HearthnetError(ErrorCode.FORBIDDEN, "the coordinator is reachable; it finalizes")
        g = Gathering(member.round_id, masks=dict(member.roster or {}))
        if member.submission is not None and member.submitted_sha is not None:
            g.submissions[self.node_id] = Submitted(member.submission, member.submitted_sha)
            g.receipts[self.node_id] = member.receipt
        body = {"round_id": member.round_id, "receipt": member.receipt.model_dump()}
        calls: list[fx.Effect] = [
            fx.Call(name=peer, peer=peer, capability=HANDOVER, body=body)
            for peer in sorted(member.participants - {self.node_id})
        ]
        return None, g, calls

    def handed(
        self,
        g: Gathering,
        member: Membership,
        peer: str,
        resp: HandoverResponse,
        blob_sha: str,
    ) -> None:
        """A checked (`check_handed`) and stored handover. It is also kept on the membership,
        so a later result listing these submissions can be recomputed here."""
        g.submissions[peer] = Submitted(resp.submission, blob_sha)
        g.receipts[peer] = resp.receipt
        member.handed[peer] = g.submissions[peer]
        member.handed_receipts[peer] = resp.receipt
        for ann in resp.masks:
            g.masks.setdefault(ann.participant, ann)
            member.handed_masks.setdefault(ann.participant, ann)

    @staticmethod
    def refused(g: Gathering, peer: str, err: HearthnetError) -> None:
        """A member that handed nothing usable: listed as excluded, with why."""
        g.excluded[peer] = f"{err.code}: {err.message}"

    def plan(self, member: Membership, g: Gathering) -> finalize.Abort | fx.Aggregate:
        """The coordinator's finalize plan over what was gathered."""
        return finalize.plan(member.signed, g.submissions, g.receipts, None, takeover=True)

    def publish(
        self, member: Membership, g: Gathering, agg: Aggregate, now: datetime
    ) -> tuple[SignedDoc, list[fx.Effect]]:
        """Sign the takeover result; store the adapter and record reputation, then (after the
        driver accepted the result here) push it to every other member."""
        done = finalize.publish(
            member.signed, agg, self.identity, now, g.excluded, {}, takeover=True
        )
        body = {"result": done.doc.model_dump()}
        return done.doc, [
            fx.StoreBlob(done.adapter),
            fx.RecordReputation(member.round_id, done.observed),
            *(
                fx.Call(name=peer, peer=peer, capability=RESULT, body=body)
                for peer in sorted(member.participants - {self.node_id})
            ),
            fx.Log(
                "info",
                "takeover published",
                {
                    "round_id": member.round_id,
                    "adapter_sha": done.adapter_sha,
                    "participants": len(g.submissions),
                },
            ),
        ]
