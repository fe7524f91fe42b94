"""The participant machine without a cluster: feed it inputs, check the effects it returns.

Every `Append` goes through the same path the driver uses (stored as JSON, parsed back with its
payload model, applied), so a fold of the records written so far is the state of a restarted
node (docs/architecture.md, "Federated rounds").
"""

from datetime import UTC, datetime, timedelta

import pytest

from hearthnet import constants as C
from hearthnet.canonical import canonical_bytes
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event
from hearthnet.fedlearn import events as ev
from hearthnet.fedlearn.aggregation.run import receipt_influence
from hearthnet.fedlearn.machines.effects import Aggregate, Append, Call, SetTimer
from hearthnet.fedlearn.machines.participant import (
    MakeShares,
    NewMaskKey,
    ParticipantMachine,
    Submit,
    Train,
    TrainOutcome,
    Wait,
    offer,
    offered_event,
)
from hearthnet.fedlearn.machines.results import Suspect
from hearthnet.fedlearn.masks import MaskingKey
from hearthnet.fedlearn.protocol import (
    EnrollResponse,
    JoinReceipt,
    RoundResult,
    SignedDoc,
    SubmissionRef,
    SubmitReceipt,
)
from hearthnet.fedlearn.secagg import confirm_bytes, make_bundle, unmask_request
from hearthnet.fedlearn.state import Stage, fold_memberships
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.identity import NodeIdentity
from tests.helpers import raises_code

TRAINED_SHA = "ab" * 32
DELTA = b"delta bytes"


class Node:
    """One participant: its identity, its log (the records the machine asked for) and the
    machine fed from it."""

    def __init__(self, coordinator: NodeIdentity, signed, roster: set[str] | None = None):
        self.coordinator = coordinator
        self.identity = NodeIdentity.generate()
        self.me = self.identity.node_id
        self.signed = signed
        self.roster = roster if roster is not None else {coordinator.node_id}
        trusted = {coordinator.node_id}
        offered = offered_event(offer(signed.to_wire(), coordinator.node_id, trusted))
        self.log: list[Event] = []
        self._store(offered)
        self.machine = self.restarted()

    def _store(self, eff: Append) -> dict:
        body = canonical_bytes(eff.payload.body())
        seq = len(self.log) + 1
        self.log.append(Event(seq, "t", eff.type, self.me, body, "", "", b""))
        return self.log[-1].payload

    def run(self, effects: list) -> None:
        """Carry out `Append`s as the driver does: store, then apply the stored record."""
        for eff in effects:
            assert isinstance(eff, Append)
            stored = self._store(eff)
            suffix = "consent" if eff.type == ev.CONSENT_EVENT else eff.type.split(".")[-1]
            self.machine.apply(suffix, type(eff.payload).model_validate(stored))

    def restarted(self) -> ParticipantMachine:
        """A fresh machine folded from the log so far (a restarted node)."""
        member = fold_memberships(self.log)[self.signed.round_id]
        return ParticipantMachine(self.identity, member, self.roster)

    def receipt(self) -> SignedDoc:
        issued = JoinReceipt(
            round_id=self.signed.round_id,
            manifest_sha=self.signed.manifest_sha,
            participant=self.me,
            coordinator=self.coordinator.node_id,
            issued_at="2026-01-01T00:00:00Z",
        )
        return SignedDoc.sign(self.coordinator, issued)

    def join(self, samples: int = 4) -> None:
        self.run(self.machine.consent(True))
        self.machine.enroll({self.coordinator.node_id})
        self.run(self.machine.enrolled(EnrollResponse(receipt=self.receipt()), samples))

    def train(self) -> None:
        outcome = TrainOutcome(TRAINED_SHA, 4, 1.5, 10, False)
        self.run(self.machine.trained(outcome))

    def submit(self) -> Call:
        call = self.machine.submission(DELTA, "cd" * 32)
        self.run(self.machine.reply("submit", self.submit_receipt()))
        return call

    def submit_receipt(self) -> SubmitReceipt:
        return SubmitReceipt(
            round_id=self.signed.round_id, participant=self.me, delta_sha="cd" * 32, accepted_at="t"
        )


def joined(node_or_machine, who: str) -> dict:
    """The coordinator's `joined` event for `who` (its receipt's signature is not re-checked)."""
    rid = node_or_machine.round_id
    return {"round_id": rid, "participant": who, "receipt": {"body": "{}", "signature": "00" * 64}}


def result_doc(node: Node, refs: list[SubmissionRef], signer=None, manifest_sha=None) -> SignedDoc:
    signer = signer or node.coordinator
    result = RoundResult(
        round_id=node.signed.round_id,
        manifest_sha=manifest_sha or node.signed.manifest_sha,
        aggregated_delta_sha="ef" * 32,
        n_participants=len(refs),
        total_samples=sum(r.num_samples for r in refs),
        aggregator=signer.node_id,
        completed_at="t",
        download_url="",
        rule="fedavg",
        lora_aggregation="frozen_a",
        secure=False,
        included=[r.participant for r in refs],
        excluded=[],
        takeover=False,
        submissions=refs,
    )
    return SignedDoc.sign(signer, result)


def my_ref(node: Node) -> SubmissionRef:
    sub = node.machine.member.submission
    assert sub is not None
    return SubmissionRef(
        participant=node.me,
        delta_sha=sub.delta_sha,
        num_samples=sub.num_samples,
        steps=sub.steps,
        signature=sub.signature,
    )


def peer_ref(node: Node, peer: NodeIdentity, delta_sha: str, num_samples: int) -> SubmissionRef:
    """An entry as another participant really signed it (results carry the signatures)."""
    signed = ParticipantSubmission.signing_bytes(
        node.machine.round_id, peer.node_id, delta_sha, num_samples, None
    )
    return SubmissionRef(
        participant=peer.node_id,
        delta_sha=delta_sha,
        num_samples=num_samples,
        signature=peer.sign(signed).hex(),
    )


@pytest.fixture
def node(coordinator, make_manifest) -> Node:
    return Node(coordinator, make_manifest())


def test_offer_consent_join_train_submit_result(node: Node):
    m = node.machine
    coord = node.coordinator.node_id
    with raises_code(ErrorCode.CONSENT_REQUIRED):
        m.consent(False)
    [consent] = m.consent(True)
    assert consent.type == ev.CONSENT_EVENT
    node.run([consent])
    assert m.consent(True) == []  # consent is given once
    call = m.enroll({coord})
    assert (call.name, call.peer, call.capability) == (
        "enroll",
        coord,
        "experimental.fedlearn.round.enroll",
    )
    assert call.body == {"round_id": m.round_id, "manifest_sha": node.signed.manifest_sha}
    node.run(m.enrolled(EnrollResponse(receipt=node.receipt()), 4))
    assert m.member.stage is Stage.JOINED
    assert m.next() == [Train(m.round_id)]
    node.train()
    assert m.next() == [Submit(m.round_id, TRAINED_SHA, None, None)]
    call = m.submission(DELTA, "cd" * 32)
    assert call.blob == DELTA and call.retry_until == node.signed.manifest.deadline_at
    assert call.body["receipt"] == m.member.receipt.model_dump()
    [submitted] = m.reply("submit", node.submit_receipt())
    node.run([submitted])
    assert m.member.stage is Stage.SUBMITTED and m.next() == []

    peer = NodeIdentity.generate()
    m.observe(1, ev.ROUND_PREFIX + "joined", joined(m, peer.node_id))
    doc = result_doc(node, [my_ref(node), peer_ref(node, peer, "11" * 32, 3)])
    result, new = m.open_result(doc, coord, takeover_turn=False)
    assert new
    held = {node.me: m.member.submission}
    receipts = {node.me: m.member.receipt}
    # the other participant's submission is not held here: checked only in part
    assert m.verify_result(result, held, receipts, {}, receipt_influence) is None
    node.run(m.completed(doc))
    assert m.member.stage is Stage.COMPLETED
    assert m.open_result(doc, coord, takeover_turn=False)[1] is False  # a duplicate
    assert m.completed(doc) == []


def test_a_result_this_node_can_recompute_is_recomputed(node: Node):
    node.join()
    node.train()
    node.submit()
    m = node.machine
    doc = result_doc(node, [my_ref(node)])
    result, _ = m.open_result(doc, node.coordinator.node_id, False)
    agg = m.verify_result(
        result, {node.me: m.member.submission}, {node.me: m.member.receipt}, {}, receipt_influence
    )
    assert isinstance(agg, Aggregate) and set(agg.submissions) == {node.me}
    assert agg.unmasked is None
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED):
        m.recomputed(result, "00" * 32)
    m.recomputed(result, result.aggregated_delta_sha)


def test_a_result_that_leaves_out_this_nodes_submission_is_refused(node: Node):
    node.join()
    node.train()
    node.submit()
    m = node.machine
    result, _ = m.open_result(result_doc(node, []), node.coordinator.node_id, False)
    with raises_code(ErrorCode.SIGNATURE_INVALID):
        m.verify_result(result, {}, {}, {}, receipt_influence)


def test_result_before_the_submit_receipt(node: Node):
    """The coordinator's completed event overtakes the answer to this node's submit call."""
    node.join()
    node.train()
    m = node.machine
    m.submission(DELTA, "cd" * 32)  # sent; the receipt is still on its way
    peer = NodeIdentity.generate()
    m.observe(2, ev.ROUND_PREFIX + "joined", joined(m, peer.node_id))
    doc = result_doc(node, [peer_ref(node, peer, "11" * 32, 3)])
    [got] = m.observe(
        3, ev.ROUND_PREFIX + "completed", {"round_id": m.round_id, "result": doc.model_dump()}
    )
    assert got == doc
    result, new = m.open_result(got, node.coordinator.node_id, False)
    # no submission recorded yet: only the listing is checked (the peer's delta is not here)
    assert new and m.verify_result(result, {}, {}, {}, receipt_influence) is None
    node.run(m.completed(got))
    assert m.member.stage is Stage.COMPLETED
    with raises_code(ErrorCode.BAD_REQUEST):  # the late receipt changes nothing
        m.reply("submit", node.submit_receipt())
    assert m.member.stage is Stage.COMPLETED and m.member.submission is None
    assert m.member.coordinator_phase == "completed"


def test_a_result_for_another_manifest_or_signer_is_refused(node: Node, make_manifest):
    node.join()
    m = node.machine
    coord = node.coordinator.node_id
    other = make_manifest()  # same coordinator, another round
    with raises_code(ErrorCode.SIGNATURE_INVALID):
        m.open_result(result_doc(node, [], manifest_sha=other.manifest_sha), coord, False)
    stranger = NodeIdentity.generate()
    with raises_code(ErrorCode.FORBIDDEN):  # not the coordinator, not a takeover in its turn
        m.open_result(result_doc(node, [], signer=stranger), stranger.node_id, False)
    doc = result_doc(node, [])
    forged = SignedDoc(body=doc.body, signature=stranger.sign(doc.body.encode()).hex())
    with pytest.raises(Suspect) as err:  # the coordinator's name, another key's signature
        m.open_result(forged, coord, False)
    assert err.value.code is ErrorCode.SIGNATURE_INVALID and err.value.what == "round result"
    assert m.member.stage is Stage.JOINED


def test_aborted_by_the_coordinator(node: Node):
    node.join()
    m = node.machine
    payload = {"round_id": m.round_id, "code": "fedlearn_min_participants_unmet", "reason": "1<3"}
    [abort] = m.observe(5, ev.ROUND_PREFIX + "aborted", payload)
    node.run([abort])
    assert m.member.stage is Stage.ABORTED
    assert m.member.abort == {"code": "fedlearn_min_participants_unmet", "reason": "1<3"}
    assert m.next() == []
    assert m.observe(5, ev.ROUND_PREFIX + "aborted", payload) == []  # a duplicate
    assert m.failed(HearthnetError(ErrorCode.TIMEOUT, "late")) == []  # ended already
    other_round = {**payload, "round_id": "X" * 26}
    assert m.observe(6, ev.ROUND_PREFIX + "aborted", other_round) == []


def test_restart_at_every_step_continues_with_the_same_next_effect(node: Node):
    """Fold the log written so far into a fresh machine at each step: same stage, same next."""
    m = node.machine
    steps = [
        lambda: node.run(m.consent(True)),
        lambda: node.run(m.enrolled(EnrollResponse(receipt=node.receipt()), 4)),
        node.train,
        node.submit,
        lambda: node.run(m.completed(result_doc(node, [my_ref(node)]))),
    ]
    for step in [lambda: None, *steps]:
        step()
        fresh = node.restarted()
        assert fresh.member.stage is m.member.stage
        assert fresh.next() == m.next()
        assert fresh.member.receipt == m.member.receipt
        assert fresh.member.submission == m.member.submission
    assert m.member.stage is Stage.COMPLETED


def test_failed_records_the_abort_once(node: Node):
    node.join()
    m = node.machine
    err = HearthnetError(ErrorCode.FEDLEARN_AGGREGATOR_UNREACHABLE, "gone " * 100)
    [abort] = m.failed(err)
    assert abort.payload.code == "fedlearn_aggregator_unreachable"
    assert len(abort.payload.reason) == 200
    node.run([abort])
    assert m.failed(err) == []


def secure_node(coordinator, make_manifest, roster: set[str]) -> Node:
    signed = make_manifest(secure=True, clip_norm=1.0)
    node = Node(coordinator, signed, roster)
    node.join(samples=4)
    return node


def announce(machine: ParticipantMachine, seq: int, who: NodeIdentity, key=None) -> None:
    rid, sha = machine.round_id, machine.signed.manifest_sha
    machine.observe(seq, ev.ROUND_PREFIX + "joined", joined(machine, who.node_id))
    ann = (key or MaskingKey()).announce(who, rid, sha, 5)
    body = {"round_id": rid, "announcement": ann.model_dump()}
    machine.observe(seq + 1, ev.ROUND_PREFIX + "mask_key", body)


def test_secure_round_keys_shares_trains_masks_and_reveals_once(coordinator, make_manifest):
    """Keys and shares before training, the share set before masking, one reveal; a second,
    different unmask request is refused; a restart with its sealed secrets carries on, one
    without them after the roster closed fails."""
    peers = [NodeIdentity.generate() for _ in range(2)]
    peer_keys = [MaskingKey() for _ in peers]
    node = secure_node(coordinator, make_manifest, {p.node_id for p in peers})
    m = node.machine
    rid = m.round_id
    assert m.next() == [NewMaskKey(rid)]
    key = MaskingKey()
    m.keyed(key)
    call, timer = m.next()
    assert isinstance(call, Call) and call.name == "mask_key"
    assert call.body["announcement"]["participant"] == node.me
    grace = timedelta(seconds=C.FEDLEARN_TAKEOVER_GRACE_S)  # a restart re-learns the roster
    assert timer == SetTimer("roster", node.signed.manifest.deadline_at + grace)
    m.reply("mask_key", None)
    assert m.next() == [timer] and not m.settled()
    m.timer("roster", datetime.now(UTC))  # before the deadline: keep waiting
    with raises_code(ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET):
        m.timer("roster", node.signed.manifest.deadline_at + timedelta(seconds=1))
    mine = call.body["announcement"]
    m.observe(1, ev.ROUND_PREFIX + "mask_key", {"round_id": rid, "announcement": mine})
    for i, (peer, k) in enumerate(zip(peers, peer_keys, strict=True)):
        announce(m, 10 + 2 * i, peer, k)
    names = [node.me, *(p.node_id for p in peers)]
    m.observe(20, ev.ROUND_PREFIX + "roster", {"round_id": rid, "participants": names})
    assert m.settled() and m.refused is None
    [make] = m.next()
    assert isinstance(make, MakeShares)
    bundle = make_bundle(node.identity, key, make.plan)
    node.run(m.shares_made(bundle))
    [send] = m.next()
    assert send.name == "shares" and send.capability.endswith("round.shares")
    m.reply("shares", None)
    assert m.next() == [Train(rid)]  # training comes after the shares are out
    node.train()
    [wait] = m.next()
    assert isinstance(wait, SetTimer)  # for the share set
    seq = 30
    bundles = {node.me: bundle}
    for peer, k in zip(peers, peer_keys, strict=True):
        bundles[peer.node_id] = make_bundle(peer, k, make.plan)
    for b in bundles.values():
        m.observe(seq, ev.ROUND_PREFIX + "shares", {"round_id": rid, "bundle": b.model_dump()})
        seq += 1
    shared = sorted(names)
    m.observe(seq, ev.ROUND_PREFIX + "shares_closed", {"round_id": rid, "participants": shared})
    assert m.settled()
    [submit] = m.next()
    assert isinstance(submit, Submit) and submit.shared == shared and submit.key is key
    node.submit()
    [idle] = m.next()  # waits for the unmask request, not forever (no takeover)
    assert isinstance(idle, SetTimer) and idle.name == "unmask" and not m.settled()
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED, "never asked to unmask"):
        node.restarted().timer("unmask", idle.at)
    req = unmask_request(make.plan, shared, shared)
    m.observe(seq + 1, ev.ROUND_PREFIX + "unmask", {"round_id": rid, "request": req.model_dump()})
    assert m.settled()
    record, confirm = m.next()
    assert confirm.name == "confirm" and isinstance(m.next()[0], Wait)  # signed: wait
    node.run([record])
    assert m.member.revealed_sha == req.sha
    sigs = {
        who.node_id: who.sign(confirm_bytes(rid, req.sha)).hex() for who in [*peers, node.identity]
    }
    assert confirm.body["signature"] == sigs[node.me]
    forged = dict(sigs, **{peers[0].node_id: sigs[node.me]})
    confirmed = {"round_id": rid, "unmask_sha": req.sha, "signatures": forged}
    m.observe(seq + 2, ev.ROUND_PREFIX + "confirmed", confirmed)
    with raises_code(ErrorCode.SIGNATURE_INVALID, "lacks a valid confirmation"):
        m.next()  # one survivor's signature is not its own: no reveal
    confirmed["signatures"] = sigs
    m.observe(seq + 3, ev.ROUND_PREFIX + "confirmed", confirmed)
    [call] = m.next()
    assert call.name == "reveal" and isinstance(m.next()[0], Wait)
    rev = call.body["reveal"]
    assert set(rev["self_shares"]) == {p.node_id for p in peers} and rev["key_shares"] == {}
    # restarted with its sealed secrets: the same answer to the same request
    again = node.restarted()
    again.keyed(key)
    again.member.roster, again.member.shared = m.member.roster, m.member.shared
    again.member.bundles, again.shares_sent = dict(m.member.bundles), True
    again.member.unmask, again.member.unmask_count = req, 1
    [same] = again.next()
    assert same.body == confirm.body
    again.member.confirmations, again.member.confirm_count = sigs, 1
    [same] = again.next()
    assert same.body == call.body
    # the coordinator asks again with a member moved to dropped: refused, as a suspect
    other = req.model_copy(update={"survivors": shared[:2], "dropped": shared[2:]})
    m.observe(seq + 4, ev.ROUND_PREFIX + "unmask", {"round_id": rid, "request": other.model_dump()})
    with raises_code(ErrorCode.SIGNATURE_INVALID) as exc:
        m.next()
    assert isinstance(exc.value, Suspect) and "second, different unmask" in exc.value.message
    lost = node.restarted()  # restarted without its sealed secrets after the roster closed
    lost.member.roster = m.member.roster
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED):
        lost.next()


def test_secure_round_with_an_outsider_key_is_refused_and_left(coordinator, make_manifest):
    """A coordinator that slips a key from outside the trust roster into the mask roster: this
    node masks nothing and leaves the round with `signature_invalid`."""
    member = NodeIdentity.generate()
    outsider = NodeIdentity.generate()
    node = secure_node(coordinator, make_manifest, {member.node_id})
    m = node.machine
    m.keyed(MaskingKey())
    call, _ = m.next()
    m.reply("mask_key", None)
    mine = call.body["announcement"]
    m.observe(1, ev.ROUND_PREFIX + "mask_key", {"round_id": m.round_id, "announcement": mine})
    announce(m, 2, member)
    announce(m, 4, outsider)
    names = [node.me, member.node_id, outsider.node_id]
    m.observe(9, ev.ROUND_PREFIX + "roster", {"round_id": m.round_id, "participants": names})
    assert m.settled() and m.member.roster is None
    with raises_code(ErrorCode.SIGNATURE_INVALID):
        m.next()
    assert m.refused is not None and m.refused.detail == {
        "outsiders": [outsider.node_id],
        "unenrolled": [],
    }
    [abort] = m.failed(m.refused)
    node.run([abort])
    assert m.member.abort is not None and m.member.abort["code"] == "signature_invalid"
    assert "outside this node's [trust] roster" in m.member.abort["reason"]


def test_an_offer_from_someone_else_is_a_suspect(coordinator, make_manifest):
    signed = make_manifest()
    with pytest.raises(Suspect) as err:
        offer(signed.to_wire(), NodeIdentity.generate().node_id, {coordinator.node_id})
    assert err.value.code is ErrorCode.SIGNATURE_INVALID and err.value.what == "manifest"
    with pytest.raises(Suspect):  # a coordinator outside the trust roster
        offer(signed.to_wire(), coordinator.node_id, set())


def test_join_records_epsilon_and_topic_and_the_budget_is_checked_before_enrolling(
    coordinator, make_manifest
):
    from hearthnet.fedlearn.budget import PrivacyPolicy, fold_ledger, round_epsilon

    signed = make_manifest(dp_noise_scale=1.0, clip_norm=1.0)
    node = Node(coordinator, signed)
    node.join()
    joined_payload = node.log[-1].payload
    eps = round_epsilon(signed.manifest, 1e-5)
    assert joined_payload["topic"] == signed.manifest.topic
    assert joined_payload["epsilon"] == pytest.approx(eps) and joined_payload["delta"] == 1e-5

    ledger = fold_ledger([(signed.round_id, signed.manifest)])
    second = Node(coordinator, make_manifest(dp_noise_scale=1.0, clip_norm=1.0))
    second.machine.privacy = PrivacyPolicy(1e-5, eps * 1.1, False)
    second.run(second.machine.consent(True))
    with raises_code(ErrorCode.PRIVACY_BUDGET_EXCEEDED, match="dp_epsilon_budget"):
        second.machine.enroll({coordinator.node_id}, ledger)
    second.machine.privacy = PrivacyPolicy(1e-5, eps * 2, False)
    assert second.machine.enroll({coordinator.node_id}, ledger).name == "enroll"


def test_require_dp_refuses_a_round_without_noise_at_enroll(coordinator, make_manifest):
    from hearthnet.fedlearn.budget import PrivacyPolicy

    node = Node(coordinator, make_manifest(dp_noise_scale=0.0))
    node.machine.privacy = PrivacyPolicy(require_dp=True)
    node.run(node.machine.consent(True))
    with raises_code(ErrorCode.PRIVACY_BUDGET_EXCEEDED, match="require_dp"):
        node.machine.enroll({coordinator.node_id}, {})
    node.run(node.machine.enrolled(EnrollResponse(receipt=node.receipt()), 4))
    assert "epsilon" not in node.log[-1].payload  # ∞ (no DP) is stored as no number


def test_a_roster_whose_graph_differs_from_the_derived_one_is_refused(coordinator, make_manifest):
    """The roster event records the SecAgg+ graph; a coordinator that claims another degree or
    threshold than the members derive gets no masked update from this node."""
    peers = [NodeIdentity.generate() for _ in range(2)]
    node = secure_node(coordinator, make_manifest, {p.node_id for p in peers})
    m = node.machine
    m.keyed(MaskingKey())
    call, _ = m.next()
    m.reply("mask_key", None)
    mine = call.body["announcement"]
    m.observe(1, ev.ROUND_PREFIX + "mask_key", {"round_id": m.round_id, "announcement": mine})
    for i, peer in enumerate(peers):
        announce(m, 10 + 2 * i, peer)
    names = [node.me, *(p.node_id for p in peers)]
    wrong = [{"size": 3, "degree": 2, "threshold": 1}]  # derived: threshold 2
    roster = {"round_id": m.round_id, "participants": names, "graph": wrong}
    m.observe(20, ev.ROUND_PREFIX + "roster", roster)
    with raises_code(ErrorCode.PROTOCOL_ERROR, "not the one its members derive"):
        m.next()
