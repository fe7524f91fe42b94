"""Rounds end to end over real nodes on loopback (issue 6; README.md, "Federated rounds").

Training is real (4-bit base, peft LoRA): a tiny random Llama for speed, the real SmolLM2 where
a test checks model quality.
"""

import asyncio
import math
from datetime import UTC, datetime, timedelta

import pytest
import torch

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.run import aggregate_submissions
from hearthnet.fedlearn.delta import deserialize_delta, read_header, serialize_delta
from hearthnet.fedlearn.lora import expected_shapes
from hearthnet.fedlearn.protocol import JoinReceipt, RoundResult, SignedDoc, SubmissionRef
from hearthnet.fedlearn.publish import read_adapter
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.identity import NodeIdentity
from hearthnet.node import Node
from tests.helpers import raises_code

from .rounds import (
    CAP,
    Cluster,
    node_config_for,
    small_draft,
    start_cluster,
    stop_cluster,
    wait_status,
    write_corpus,
)

pytestmark = pytest.mark.timeout(600)


def _result(status) -> RoundResult:
    return status.result.claimed(RoundResult)


async def _announce(cluster, name="alice", **draft):
    return await cluster.call(name, "round.announce", {"draft": small_draft(**draft)})


async def _join(cluster, names, round_id):
    for name in names:
        await cluster.call(name, "round.join", {"round_id": round_id, "consent": True}, timeout=60)


async def test_two_node_round_on_smollm_applies_and_keeps_perplexity_sane(tmp_path, smollm_dir):
    """The whole round: announce → join → train 10 steps → submit → aggregate → apply."""
    c = await start_cluster(tmp_path, ["alice", "bob"], smollm_dir, llm_enabled=("alice",))
    try:
        ann = await _announce(c, deadline_in_s=300)
        assert ann.offered_to == [c["bob"].node_id]
        await _join(c, ["alice", "bob"], ann.round_id)
        status = await wait_status(c, "alice", ann.round_id, 400)
        assert status.phase == "completed", status.abort
        result = status.result.open(RoundResult, c["alice"].node_id)
        assert result.n_participants == 2 and not result.takeover and result.rule == "fedavg"
        sha = result.aggregated_delta_sha
        bob = await wait_status(c, "bob", ann.round_id, 60)
        assert bob.stage == "completed" and c["bob"].blobs.has(sha)  # distributed by SHA
        applied = await c.call("alice", "adapter.apply", {"sha": sha, "scope": "session"})
        assert applied.session_id and applied.node_default is None  # node apply is separate
        held_out = ["Our fire brigade meets at the old school hall on Thursday evenings."] * 2
        base = await c["alice"].bus.call("llm.perplexity", {"texts": held_out})
        tuned = await c["alice"].bus.call("llm.perplexity", {"texts": held_out, "adapter_sha": sha})
        assert math.isfinite(tuned.perplexity) and tuned.perplexity <= 2 * base.perplexity
        out = await c["alice"].bus.call(
            "llm.generate",
            {"prompt": "Hello", "session_id": applied.session_id, "max_new_tokens": 8},
        )
        assert out.adapter_sha == sha
        # alice judges the adapter on her own held-out text (kept out of her training) before
        # making it the node default; both judgements are events in her log.
        report = await c.call("alice", "adapter.evaluate", {"sha": sha}, timeout=300)
        assert report.texts >= 1 and report.topic == "village" and report.passes
        assert report.perplexity_adapter < 0.9 * report.perplexity_base  # 10 steps: ~111 -> ~89
        held = c["alice"].fedlearn.participant.provider.held_out("village")
        assert held and not set(held) & set(
            c["alice"].fedlearn.participant.provider.samples("village")
        )
        node = await c.call("alice", "adapter.apply", {"sha": sha, "scope": "node"}, timeout=300)
        assert node.node_default == sha and node.evaluation.passes and not node.forced
        assert node.evaluation.perplexity_adapter == report.perplexity_adapter  # reproducible
        events = await c["alice"].eventlog.read_all("fedlearn.adapter.evaluated")
        assert [e.payload["purpose"] for e in events] == ["evaluate", "apply"]
        assert events[-1].seq == node.evaluation.event_seq
    finally:
        await stop_cluster(c)


async def test_node_apply_refuses_an_adapter_that_fails_the_held_out_check(
    tmp_path, tiny_model_dir
):
    # A bound no adapter can meet stands in for a harmful adapter: the refusal path is the same.
    c = await start_cluster(
        tmp_path,
        ["alice", "bob"],
        tiny_model_dir,
        llm_enabled=("alice",),
        fedlearn={"apply_max_perplexity_ratio": 0.001},
    )
    try:
        ann = await _announce(c, deadline_in_s=120)
        await _join(c, ["alice", "bob"], ann.round_id)
        status = await wait_status(c, "alice", ann.round_id, 120)
        assert status.phase == "completed", status.abort
        sha = _result(status).aggregated_delta_sha
        with pytest.raises(HearthnetError) as exc:
            await c.call("alice", "adapter.apply", {"sha": sha, "scope": "node"}, timeout=120)
        assert exc.value.code is ErrorCode.ADAPTER_REJECTED
        assert "apply_max_perplexity_ratio" in exc.value.message and "--force" in exc.value.message
        assert c["alice"].llm.node_default is None  # refused: nothing changed
        forced = await c.call(
            "alice", "adapter.apply", {"sha": sha, "scope": "node", "force": True}, timeout=120
        )
        assert forced.forced and not forced.evaluation.passes and forced.node_default == sha
        # bob has no model loaded: judging needs it, and the refusal says which key to set.
        with pytest.raises(HearthnetError) as exc:
            await c.call("bob", "adapter.evaluate", {"sha": sha}, timeout=60)
        assert exc.value.code is ErrorCode.MODEL_UNAVAILABLE
        assert "[llm] enabled = true" in exc.value.message
        # Without text for the topic there is nothing to judge on: refused unless forced.
        for path in (tmp_path / "alice" / "training").iterdir():
            path.unlink()
        with pytest.raises(HearthnetError) as exc:
            await c.call("alice", "adapter.apply", {"sha": sha, "scope": "node"}, timeout=60)
        assert exc.value.code is ErrorCode.DATA_INVALID
        assert "no held-out text for topic 'village'" in exc.value.message
        assert "--force" in exc.value.message
        unjudged = await c.call(
            "alice", "adapter.apply", {"sha": sha, "scope": "node", "force": True}, timeout=60
        )
        assert unjudged.forced and unjudged.evaluation is None
        events = await c["alice"].eventlog.read_all("fedlearn.adapter.evaluated")
        assert [(e.payload["forced"], e.payload.get("passes")) for e in events] == [
            (False, False),
            (True, False),
            (True, None),
        ]
        assert events[-1].payload["unjudged"] == "data_invalid"
    finally:
        await stop_cluster(c)


async def test_three_node_secure_round_matches_plain_average(tmp_path, tiny_model_dir):
    c = await start_cluster(tmp_path, ["alice", "bob", "carol", "dave"], tiny_model_dir)
    try:
        ann = await _announce(
            c, secure=True, min_participants=3, max_participants=3, deadline_in_s=90
        )
        with raises_code(ErrorCode.FORBIDDEN, "cannot also be a member"):
            await _join(c, ["alice"], ann.round_id)  # it would hold a share of every secret
        await _join(c, ["bob", "carol", "dave"], ann.round_id)
        status = await wait_status(c, "alice", ann.round_id, 120)
        assert status.phase == "completed", status.abort
        result = _result(status)
        assert result.secure and result.n_participants == 3
        # The coordinator saw masked vectors only; their sum equals the plain weighted mean of
        # the clipped deltas within the quantisation bound.
        record = c["alice"].fedlearn.coordinator.rounds[ann.round_id]
        for sub in record.submissions.values():
            _, meta = read_header(
                c["alice"].blobs.get(sub.blob_sha), C.BLOB_MAX_BYTES, frozenset({"U64"})
            )
            assert meta["format"] == C.FEDLEARN_MASKED_FORMAT
        plain = {}
        for name in ("bob", "carol", "dave"):
            member = c[name].fedlearn.participant.members[ann.round_id]
            plain[c[name].node_id] = (member.trained_sha, member.num_samples, c[name])
        tensors, _ = read_adapter(c["alice"].blobs.get(result.aggregated_delta_sha))
        total = sum(n for _, n, _ in plain.values())
        for key in [k for k in tensors if k.endswith("lora_B")]:
            expected = (
                sum(
                    deserialize_delta(node.blobs.get(sha))[0][key].double() * n
                    for sha, n, node in plain.values()
                )
                / total
            )
            assert torch.allclose(tensors[key].double(), expected, atol=1e-6)
    finally:
        await stop_cluster(c)


async def _bob_and_carol_submit_dave_drops_out(c, round_id):
    """bob and carol join and submit; dave enrolls through the protocol but never submits."""
    await _join(c, ["bob", "carol"], round_id)
    manifest_sha = c["bob"].fedlearn.participant.members[round_id].signed.manifest_sha
    await c["dave"].bus.call(
        CAP + "round.enroll",
        {"round_id": round_id, "manifest_sha": manifest_sha},
        peer=c["alice"].node_id,
    )
    coordinator = c["alice"].fedlearn.coordinator
    async with coordinator.changed:
        await asyncio.wait_for(
            coordinator.changed.wait_for(
                lambda: len(coordinator.rounds[round_id].submissions) == 2
            ),
            60,
        )


async def test_takeover_reproduces_the_coordinators_sha(tmp_path, tiny_model_dir):
    c = await start_cluster(tmp_path, ["alice", "bob", "carol", "dave"], tiny_model_dir)
    try:
        ann = await _announce(c, deadline_in_s=25)
        await _bob_and_carol_submit_dave_drops_out(c, ann.round_id)
        await c["alice"].stop()  # the coordinator vanishes before the deadline
        with pytest.raises(HearthnetError) as exc:
            await c.call("bob", "round.finalize", {"round_id": ann.round_id})
        assert exc.value.code is ErrorCode.FEDLEARN_AGGREGATOR_UNREACHABLE
        bob = await wait_status(c, "bob", ann.round_id, 90)
        carol = await wait_status(c, "carol", ann.round_id, 30)
        assert bob.stage == carol.stage == "completed"
        taken = _result(bob)
        assert taken.takeover and taken.aggregator in (c["bob"].node_id, c["carol"].node_id)
        assert _result(carol).aggregated_delta_sha == taken.aggregated_delta_sha
        assert [e.participant for e in taken.excluded] == [c["dave"].node_id]
        # The coordinator comes back, rebuilds the round from its log and aggregates the same
        # submissions itself: the same adapter SHA.
        await c["alice"].start()
        status = await wait_status(c, "alice", ann.round_id, 60)
        assert status.phase == "completed"
        own = status.result.open(RoundResult, c["alice"].node_id)
        assert not own.takeover and own.aggregated_delta_sha == taken.aggregated_delta_sha
    finally:
        await stop_cluster(c)


async def test_a_takeover_node_refuses_a_result_its_handed_submissions_disprove(
    tmp_path, tiny_model_dir
):
    """Issue 13: after the takeover, the other participant (whose turn it now is) pushes the
    taker a signed takeover result under the real manifest (so it passes `check_adapter`) with
    other adapter values, then one listing the taker's own submission under another SHA. The
    taker holds every listed submission: it recomputes and refuses the first, refuses the second
    on its own entry, records a security event, and installs and serves neither."""
    from hearthnet.fedlearn.machines.taker import preference
    from hearthnet.fedlearn.publish import adapter_bytes, check_adapter

    c = await start_cluster(tmp_path, ["alice", "bob", "carol", "dave"], tiny_model_dir)
    try:
        ann = await _announce(c, deadline_in_s=25)
        await _bob_and_carol_submit_dave_drops_out(c, ann.round_id)
        await c["alice"].stop()
        for name in ("bob", "carol"):
            assert (await wait_status(c, name, ann.round_id, 90)).stage == "completed"
        taken = _result(await wait_status(c, "bob", ann.round_id, 5))
        x, y = ("bob", "carol") if taken.aggregator == c["bob"].node_id else ("carol", "bob")
        taker = c[x].fedlearn.participant
        member = taker.members[ann.round_id]
        assert set(member.handed) == {c[y].node_id}  # what the takeover was handed is kept
        signed = member.signed

        real, _ = read_adapter(c[x].blobs.get(taken.aggregated_delta_sha))
        forged = adapter_bytes({k: v * 2 for k, v in real.items()}, signed)
        shapes = c[x].fedlearn.ctx.model_shapes()
        check_adapter(forged, signed, c[x].fedlearn.ctx.roster, shapes)  # looks like an adapter
        forged_sha = c[y].blobs.put(forged)
        c[y].fedlearn.participant.published.add(forged_sha)  # the hostile member serves it

        order = preference(ann.round_id, member.participants | {c[x].node_id})
        turn = (
            C.FEDLEARN_TAKEOVER_GRACE_S
            + order.index(c[y].node_id) * C.FEDLEARN_TAKEOVER_STAGGER_S
            - C.FEDLEARN_CLOCK_SKEW_S
        )
        wait = (signed.manifest.deadline_at - datetime.now(UTC)).total_seconds() + turn + 0.5
        await asyncio.sleep(max(0.0, wait))  # now it is y's turn in the public order

        def push(result: RoundResult):
            doc = SignedDoc.sign(c[y].identity, result)
            return c[y].bus.call(
                CAP + "round.result", {"result": doc.model_dump()}, peer=c[x].node_id
            )

        base = taken.model_copy(update={"aggregator": c[y].node_id, "download_url": "h://y"})
        with pytest.raises(HearthnetError) as exc:
            await push(base.model_copy(update={"aggregated_delta_sha": forged_sha}))
        assert exc.value.code is ErrorCode.FEDLEARN_AGGREGATION_FAILED
        assert "not the aggregate" in exc.value.message
        wrong = [
            r.model_copy(update={"delta_sha": "00" * 32}) if r.participant == c[x].node_id else r
            for r in taken.submissions
        ]
        with pytest.raises(HearthnetError) as exc:
            await push(
                base.model_copy(update={"aggregated_delta_sha": forged_sha, "submissions": wrong})
            )
        assert exc.value.code is ErrorCode.SIGNATURE_INVALID
        assert "never signed" in exc.value.message
        # A review's bypasses: list a phantom participant nobody holds, or nothing at all, so
        # that no node could recompute. Both are refused before any recomputation is skipped.
        phantom = NodeIdentity.generate().node_id
        ghost = SubmissionRef(
            participant=phantom, delta_sha="ab" * 32, num_samples=1, signature="00" * 64
        )
        for dodge in (
            {
                "included": [*taken.included, phantom],
                "submissions": [*taken.submissions, ghost],
                "total_samples": taken.total_samples + 1,
            },
            {"submissions": []},
        ):
            with pytest.raises(HearthnetError) as exc:
                await push(base.model_copy(update={"aggregated_delta_sha": forged_sha, **dodge}))
            assert exc.value.code is ErrorCode.SIGNATURE_INVALID

        assert forged_sha not in taker.published and not c[x].blobs.has(forged_sha)
        assert member.result.claimed(RoundResult).aggregated_delta_sha == (
            taken.aggregated_delta_sha
        )
        events = await c[x].eventlog.read_all("security.signature.invalid")
        assert any(
            e.payload["object"] == "round result content" and e.payload["peer"] == c[y].node_id
            for e in events
        )
    finally:
        await stop_cluster(c)


def _forged_submission(node: Node, signed, delta, samples=5, steps=None):
    data = serialize_delta(
        delta, manifest_sha=signed.manifest_sha, round_id=signed.round_id, participant=node.node_id
    )
    sub = ParticipantSubmission.create(
        node.identity, signed.round_id, data, samples, 0.1, steps=steps
    )
    return sub, data


async def test_garbage_is_rejected_and_too_few_valid_submissions_abort(tmp_path, tiny_model_dir):
    c = await start_cluster(tmp_path, ["alice", "bob", "carol", "dave"], tiny_model_dir)
    try:
        ann = await _announce(c, min_participants=3, deadline_in_s=20)
        await _join(c, ["bob", "carol"], ann.round_id)
        alice_id = c["alice"].node_id
        signed = c["bob"].fedlearn.participant.members[ann.round_id].signed
        enrolled = await c["dave"].bus.call(
            CAP + "round.enroll",
            {"round_id": ann.round_id, "manifest_sha": signed.manifest_sha},
            peer=alice_id,
        )
        receipt = enrolled.receipt.model_dump()
        shapes = expected_shapes(signed.manifest, c["alice"].fedlearn.ctx.model_shapes())
        good = {k: torch.zeros(s) for k, s in shapes.items()}

        async def submit(delta, receipt=receipt, steps=None):
            sub, data = _forged_submission(c["dave"], signed, delta, steps=steps)
            return await c["dave"].bus.call(
                CAP + "round.submit",
                {"submission": sub.model_dump(), "receipt": receipt},
                peer=alice_id,
                blob=data,
            )

        nan = dict(good)
        first = sorted(nan)[0]
        nan[first] = nan[first].clone()
        nan[first][0, 0] = float("nan")
        missing = dict(good)
        del missing[sorted(missing)[-1]]
        for delta in (nan, missing):
            with pytest.raises(HearthnetError) as exc:
                await submit(delta)
            assert exc.value.code is ErrorCode.DELTA_INVALID
        with pytest.raises(HearthnetError) as exc:  # more steps than the manifest asked for
            await submit(good, steps=signed.manifest.train_steps + 1)
        assert (
            exc.value.code is ErrorCode.DELTA_INVALID and "11 training steps" in exc.value.message
        )
        # someone else's receipt is no receipt
        bob_receipt = c["bob"].fedlearn.participant.members[ann.round_id].receipt.model_dump()
        with pytest.raises(HearthnetError) as exc:
            await submit(good, bob_receipt)
        assert exc.value.code is ErrorCode.FORBIDDEN
        status = await wait_status(c, "alice", ann.round_id, 90)
        assert status.phase == "aborted"
        assert status.abort["code"] == "fedlearn_min_participants_unmet"
        assert len(status.submitted) == 2 and {r["code"] for r in status.rejected} >= {
            "delta_invalid"
        }
        events = await c["alice"].eventlog.read_all("fedlearn.round.")
        assert [e.type for e in events].count("fedlearn.round.rejected") == 4
        # steps run vs requested, from the signed submissions (10 steps: too few to plateau)
        honest = {c["bob"].node_id, c["carol"].node_id}
        assert status.train_steps == 10 and status.steps == dict.fromkeys(sorted(honest), 10)
        stored = [e.payload["submission"] for e in events if e.type == "fedlearn.round.submitted"]
        assert sorted(s["participant"] for s in stored) == sorted(honest)
        assert all(s["steps"] == 10 for s in stored)
        bob = await wait_status(c, "bob", ann.round_id, 30)
        assert bob.stage == "aborted"
        assert bob.train_steps == 10 and bob.steps == {c["bob"].node_id: 10}
        # a participant's delta lies in the coordinator's blob store but is never served
        record = c["alice"].fedlearn.coordinator.rounds[ann.round_id]
        delta_sha = next(iter(record.submissions.values())).blob_sha
        assert c["alice"].blobs.has(delta_sha)
        with pytest.raises(HearthnetError) as exc:
            await c["dave"].bus.call(CAP + "adapter.fetch", {"sha": delta_sha}, peer=alice_id)
        assert exc.value.code is ErrorCode.ADAPTER_NOT_FOUND
        with pytest.raises(HearthnetError) as exc:  # late: after the deadline
            await submit(good)
        assert exc.value.code in (ErrorCode.ROUND_CLOSED,)
    finally:
        await stop_cluster(c)


async def test_join_refusals(tmp_path, tiny_model_dir):
    c = await start_cluster(tmp_path, ["alice", "bob", "carol", "dave"], tiny_model_dir)
    try:
        ann = await _announce(c, max_participants=2, deadline_in_s=8)
        with pytest.raises(HearthnetError) as exc:
            await c.call("bob", "round.join", {"round_id": ann.round_id})
        assert exc.value.code is ErrorCode.CONSENT_REQUIRED
        await _join(c, ["bob", "carol"], ann.round_id)
        with pytest.raises(HearthnetError) as exc:
            await c.call("dave", "round.join", {"round_id": ann.round_id, "consent": True})
        assert exc.value.code is ErrorCode.ROUND_FULL
        consent = await c["dave"].eventlog.read_all("fedlearn.consent.granted")
        assert len(consent) == 1  # recorded, signed, before the refusal
        late = await _announce(c, deadline_in_s=2)
        await asyncio.sleep(3)
        with pytest.raises(HearthnetError) as exc:
            await c.call("dave", "round.join", {"round_id": late.round_id, "consent": True})
        assert exc.value.code is ErrorCode.ROUND_CLOSED
    finally:
        await stop_cluster(c)


async def test_an_open_round_reaches_a_peer_that_connects_later(tmp_path, tiny_model_dir):
    """Announced with nobody connected, a round is offered to a peer when it connects while the
    round is open; it can consent, join and complete. A round past its deadline is not."""
    ids = {n: NodeIdentity.generate() for n in ("alice", "bob")}
    for name in ids:
        write_corpus(tmp_path / name / "training", name, "village")
    alice = Node(node_config_for(tmp_path, "alice", tiny_model_dir, ids, []), ids["alice"])
    await alice.start()
    c = Cluster({"alice": alice}, tmp_path)
    try:
        ann = await _announce(c, min_participants=1, max_participants=2, deadline_in_s=90)
        closed = await _announce(c, deadline_in_s=1)
        assert ann.offered_to == [] and closed.offered_to == []
        await asyncio.sleep(1.5)  # `closed` is past its deadline before bob comes
        bob = Node(
            node_config_for(tmp_path, "bob", tiny_model_dir, ids, [alice.listen_url]), ids["bob"]
        )
        await bob.start()
        c.nodes["bob"] = bob
        async with asyncio.timeout(15):
            while not (await c.call("bob", "round.pending")).rounds:
                await asyncio.sleep(0.1)
        pending = [r.round_id for r in (await c.call("bob", "round.pending")).rounds]
        assert pending == [ann.round_id]
        assert closed.round_id not in bob.fedlearn.participant.members
        # Reconnecting does not buy more offers: within the cooldown a new session of bob's
        # (what each reconnect reports) sends nothing.
        tasks = set(alice.fedlearn.ctx.tasks)
        for _ in range(5):
            alice.fedlearn.peer_connected(bob.node_id)
        assert set(alice.fedlearn.ctx.tasks) <= tasks
        await _join(c, ["bob"], ann.round_id)
        status = await wait_status(c, "alice", ann.round_id)
        assert status.phase == "completed" and status.submitted == [bob.node_id]
    finally:
        await stop_cluster(c)


async def test_wrong_base_model_untrusted_manifest_and_disabled_flag(tmp_path, tiny_model_dir):
    from transformers import LlamaForCausalLM

    other = tmp_path / "other-model"
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.weight)
    model.save_pretrained(other)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            (other / f.name).write_bytes(f.read_bytes())
    c = await start_cluster(tmp_path, ["alice", "bob"], tiny_model_dir)
    ids = {"alice": c["alice"].identity, "bob": c["bob"].identity, "eve": NodeIdentity.generate()}
    eve = Node(
        node_config_for(tmp_path, "eve", other, ids, [c["alice"].listen_url, c["bob"].listen_url]),
        ids["eve"],
    )
    off = Node(
        node_config_for(tmp_path, "off", tiny_model_dir, ids, [c["alice"].listen_url], flag=False),
        NodeIdentity.generate(),
    )
    await eve.start()
    await off.start()
    try:
        await eve.wait_for_peer(c["alice"].node_id)
        await off.wait_for_peer(c["alice"].node_id)
        ann = await _announce(c)
        assert eve.node_id in ann.offered_to and off.node_id not in ann.offered_to
        with pytest.raises(HearthnetError) as exc:
            await eve.bus.call(CAP + "round.join", {"round_id": ann.round_id, "consent": True})
        assert exc.value.code is ErrorCode.BASE_MODEL_MISMATCH
        # eve is outside bob's roster: her manifest is signature_invalid, and a security event
        from hearthnet.fedlearn.manifest import RoundManifestDraft

        draft = {**small_draft(), "base_model_id": "x", "base_model_sha": eve.llm.base_model_sha}
        draft["deadline"] = datetime.now(UTC) + timedelta(minutes=5)
        draft.pop("deadline_in_s")
        signed = RoundManifestDraft.model_validate(draft).build(eve.identity, eve.config.fedlearn)
        with pytest.raises(HearthnetError) as exc:
            await eve.bus.call(
                CAP + "round.offer", {"manifest": signed.to_wire()}, peer=c["bob"].node_id
            )
        assert (
            exc.value.code is ErrorCode.SIGNATURE_INVALID
            and exc.value.message == "manifest rejected"
        )
        assert await c["bob"].eventlog.read_all("security.signature.invalid")
        # A flood of bad offers costs bob one event per interval, not one fsync each; every one
        # is still counted in node status.
        for _ in range(200):
            with pytest.raises(HearthnetError) as exc:
                await eve.bus.call(
                    CAP + "round.offer", {"manifest": signed.to_wire()}, peer=c["bob"].node_id
                )
            assert exc.value.code is ErrorCode.SIGNATURE_INVALID
        events = await c["bob"].eventlog.read_all("security.signature.invalid")
        assert [e.payload["peer"] for e in events] == [eve.node_id]
        assert c["bob"]._security_counts()["security.signature.invalid"] == 201
        # the flag off: every fedlearn name answers experimental_disabled, read-only ones too
        for name in ("round.list", "round.status", "adapter.fetch"):
            for caller, peer in ((off, None), (c["alice"], off.node_id)):
                with pytest.raises(HearthnetError) as exc:
                    await caller.bus.call(CAP + name, {}, peer=peer)
                assert exc.value.code is ErrorCode.EXPERIMENTAL_DISABLED
        # a delta is never served as an adapter
        with pytest.raises(HearthnetError) as exc:
            await eve.bus.call(CAP + "adapter.fetch", {"sha": "0" * 64}, peer=c["alice"].node_id)
        assert exc.value.code is ErrorCode.ADAPTER_NOT_FOUND
    finally:
        await eve.stop()
        await off.stop()
        await stop_cluster(c)


def test_receipt_binds_participant_and_round():
    coordinator, someone = NodeIdentity.generate(), NodeIdentity.generate()
    receipt = SignedDoc.sign(
        coordinator,
        JoinReceipt(
            round_id="01M80WAYYFD3P33D6819RBBN9R",
            manifest_sha="a" * 64,
            participant=someone.node_id,
            coordinator=coordinator.node_id,
            issued_at="2026-01-01T00:00:00Z",
        ),
    )
    assert receipt.open(JoinReceipt, coordinator.node_id).participant == someone.node_id
    with pytest.raises(HearthnetError) as exc:
        receipt.open(JoinReceipt, someone.node_id)
    assert exc.value.code is ErrorCode.SIGNATURE_INVALID
    tampered = receipt.model_copy(update={"body": receipt.body.replace("a" * 64, "b" * 64)})
    with raises_code(ErrorCode.SIGNATURE_INVALID):
        tampered.open(JoinReceipt, coordinator.node_id)


def test_aggregate_submissions_is_order_independent(tmp_path, make_manifest):
    from .conftest import MODEL_SHAPES, random_delta

    signed = make_manifest()
    people = [NodeIdentity.generate() for _ in range(3)]
    subs, paths = {}, {}
    for i, ident in enumerate(people):
        data = serialize_delta(
            random_delta(signed, i),
            manifest_sha=signed.manifest_sha,
            round_id=signed.round_id,
            participant=ident.node_id,
        )
        sub = ParticipantSubmission.create(ident, signed.round_id, data, 10 + i, 0.1)
        path = tmp_path / sub.delta_sha
        path.write_bytes(data)
        subs[ident.node_id], paths[sub.delta_sha] = sub, path
    first = aggregate_submissions(signed, subs, paths.__getitem__, MODEL_SHAPES)
    shuffled = dict(reversed(list(subs.items())))
    second = aggregate_submissions(signed, shuffled, paths.__getitem__, MODEL_SHAPES)
    assert first.adapter == second.adapter and first.included == sorted(subs)


async def test_coordinator_killed_and_restarted_mid_round_completes(tmp_path, tiny_model_dir):
    """SIGKILL the coordinator daemon after the joins; it rebuilds the round from its log,
    the participants resubmit to it, and the round completes."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from hearthnet.control import control_call

    ids = {n: NodeIdentity.generate() for n in ("alice", "bob", "carol")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    alice_cfg = node_config_for(tmp_path, "alice", tiny_model_dir, ids, [], port=port)
    data = alice_cfg.data_dir
    data.mkdir(parents=True, mode=0o700)
    ids["alice"].save(data / "node.key")
    (data / "node.toml").write_text(
        f'[node]\nname = "alice"\ndata_dir = "."\nnetwork_id = "test-net"\n'
        f'[listen]\nhost = "127.0.0.1"\nport = {port}\n'
        f"[trust]\nroster = {[i.node_id for i in ids.values()]!r}\n".replace("'", '"')
        + "[experimental]\nfedlearn = true\n[fedlearn]\nmin_round_participants = 1\n"
        f'[llm]\nbase_model = "{tiny_model_dir}"\ncache_dir = "{tmp_path / "model-cache"}"\n'
    )
    sock = data / C.CONTROL_SOCKET_NAME

    def start_alice():
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hearthnet.cli",
                "node",
                "start",
                "--config",
                str(data / "node.toml"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ctl(cap, body, timeout=30.0):
        return await asyncio.to_thread(control_call, sock, CAP + cap, body, None, timeout)

    async def up():
        for _ in range(300):
            if sock.exists():
                try:
                    return await asyncio.to_thread(control_call, sock, "node.status", {}, None, 5.0)
                except (HearthnetError, OSError):
                    pass
            await asyncio.sleep(0.2)
        raise AssertionError("alice did not come up")

    from .rounds import write_corpus

    proc = start_alice()
    nodes = []
    try:
        await up()
        for name in ("bob", "carol"):
            write_corpus(tmp_path / name / "training", name, "village")
            cfg = node_config_for(tmp_path, name, tiny_model_dir, ids, [f"wss://127.0.0.1:{port}"])
            node = Node(cfg, ids[name])
            await node.start()
            await node.wait_for_peer(ids["alice"].node_id)
            nodes.append(node)
        ann = await ctl("round.announce", {"draft": small_draft(deadline_in_s=60)})
        for node in nodes:
            await node.bus.call(CAP + "round.join", {"round_id": ann["round_id"], "consent": True})
        os.kill(proc.pid, signal.SIGKILL)  # mid-round: joined, nothing aggregated
        proc.wait()
        sock.unlink(missing_ok=True)
        proc = start_alice()
        await up()
        status = await ctl(
            "round.status", {"round_id": ann["round_id"], "wait": True, "timeout_s": 90}, 100
        )
        assert status["phase"] == "completed", status
        assert len(status["submitted"]) == 2 and len(status["joined"]) == 2
        for node in nodes:
            st = await node.bus.call(
                CAP + "round.status", {"round_id": ann["round_id"], "wait": True, "timeout_s": 30}
            )
            assert st.stage == "completed"
    finally:
        for node in nodes:
            await node.stop()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


async def test_a_member_cannot_pass_off_a_delta_or_a_forged_adapter_as_the_result(
    tmp_path, tiny_model_dir
):
    """Issue 13, items 1-2: bob, a fellow participant, sends carol a signed 'takeover' result
    naming carol's own delta, to make her serve it. It is refused, the delta stays unservable;
    the bytes a result names are checked (a delta, a zero manifest signature, all 7.0 under a
    zero signature, a NaN, a missing tensor are all refused) and the coordinator's real result
    is still accepted."""
    from hearthnet.fedlearn.manifest import SignedManifest
    from hearthnet.fedlearn.publish import adapter_bytes, check_adapter

    c = await start_cluster(tmp_path, ["alice", "bob", "carol", "dave"], tiny_model_dir)
    try:
        ann = await _announce(c, deadline_in_s=20)
        await _bob_and_carol_submit_dave_drops_out(c, ann.round_id)  # alice waits: deadline
        carol = c["carol"].fedlearn.participant
        victim = carol.members[ann.round_id].trained_sha
        signed = carol.members[ann.round_id].signed
        forged = RoundResult(
            round_id=ann.round_id,
            manifest_sha=signed.manifest_sha,
            aggregated_delta_sha=victim,
            n_participants=2,
            total_samples=10,
            aggregator=c["bob"].node_id,
            completed_at="2026-12-01T00:00:00Z",
            download_url="hearthnet://x",
            rule="fedavg",
            lora_aggregation=signed.manifest.lora_aggregation,
            secure=False,
            included=sorted([c["bob"].node_id, c["carol"].node_id]),
            excluded=[],
            takeover=True,
        )
        push = {"result": SignedDoc.sign(c["bob"].identity, forged).model_dump()}
        # Before the deadline, with the coordinator reachable, it is nobody's turn to take over.
        with pytest.raises(HearthnetError) as exc:
            await c["bob"].bus.call(CAP + "round.result", push, peer=c["carol"].node_id)
        assert exc.value.code is ErrorCode.FORBIDDEN
        with pytest.raises(HearthnetError) as exc:
            await c["bob"].bus.call_blob(
                CAP + "adapter.fetch", {"sha": victim}, peer=c["carol"].node_id
            )
        assert exc.value.code is ErrorCode.ADAPTER_NOT_FOUND
        assert victim not in carol.published

        shapes = c["carol"].fedlearn.ctx.model_shapes()
        roster = c["carol"].fedlearn.ctx.roster
        with pytest.raises(HearthnetError) as exc:  # whatever a result names must be an adapter
            check_adapter(c["carol"].blobs.get(victim), signed, roster, shapes)
        assert exc.value.code is ErrorCode.DELTA_INVALID

        status = await wait_status(c, "alice", ann.round_id, 60)  # the real result
        assert status.phase == "completed", status.abort
        sha = _result(status).aggregated_delta_sha
        real, _ = read_adapter(c["alice"].blobs.get(sha))
        unsigned = SignedManifest(signed.manifest, signed.body, bytes(64))
        nan = {k: v.clone() for k, v in real.items()}
        next(iter(nan.values()))[0, 0] = float("nan")
        for bad, code in (
            (
                adapter_bytes({k: torch.full_like(v, 7.0) for k, v in real.items()}, unsigned),
                ErrorCode.SIGNATURE_INVALID,
            ),
            (adapter_bytes(real, unsigned), ErrorCode.SIGNATURE_INVALID),
            (adapter_bytes(nan, signed), ErrorCode.DELTA_INVALID),
            (adapter_bytes(dict(list(real.items())[1:]), signed), ErrorCode.DELTA_INVALID),
        ):
            with pytest.raises(HearthnetError) as exc:
                check_adapter(bad, signed, roster, shapes)
            assert exc.value.code is code
        check_adapter(c["alice"].blobs.get(sha), signed, roster, shapes)  # the real one passes
        done = await wait_status(c, "carol", ann.round_id, 30)
        assert done.stage == "completed" and _result(done).aggregated_delta_sha == sha
        assert sha in carol.published and victim not in carol.published
    finally:
        await stop_cluster(c)


async def test_a_secure_round_with_a_key_from_outside_the_roster_masks_nothing(
    tmp_path, tiny_model_dir
):
    """Issue 13 item 7: the coordinator (alice) lets mallory, whom bob and carol do not trust,
    into a secure round's mask roster. bob and carol refuse to mask with her key: they leave
    the round without submitting, so no masked update of theirs reaches anyone."""
    ids = {n: NodeIdentity.generate() for n in ("alice", "bob", "carol", "mallory")}
    community = {n: ids[n] for n in ("alice", "bob", "carol")}
    nodes = {}
    for name in ids:
        write_corpus(tmp_path / name / "training", name, "village")
        trusted = community if name in ("bob", "carol") else ids
        peers = [] if name == "alice" else [nodes["alice"].listen_url]
        nodes[name] = Node(
            node_config_for(tmp_path, name, tiny_model_dir, trusted, peers), ids[name]
        )
        await nodes[name].start()
    c = Cluster(nodes, tmp_path)
    try:
        for name in ("bob", "carol", "mallory"):
            await nodes["alice"].wait_for_peer(ids[name].node_id, 10.0)
        ann = await _announce(
            c, secure=True, min_participants=3, max_participants=3, deadline_in_s=40
        )
        await _join(c, ["bob", "carol", "mallory"], ann.round_id)
        for name in ("bob", "carol"):
            status = await wait_status(c, name, ann.round_id, 60)
            assert status.stage == "aborted", status
            member = nodes[name].fedlearn.participant.members[ann.round_id]
            assert member.roster is None  # never adopted: no pairwise mask was derived
        record = nodes["alice"].fedlearn.coordinator.rounds[ann.round_id]
        assert not {ids["bob"].node_id, ids["carol"].node_id} & set(record.submissions)
        events = await nodes["bob"].eventlog.read_all("fedlearn.participant.aborted")
        assert events and events[-1].payload["code"] == "signature_invalid"
        assert "outside this node's [trust] roster" in events[-1].payload["reason"]
    finally:
        await stop_cluster(c)
