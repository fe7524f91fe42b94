"""A robust round over real nodes: one participant poisons its delta; the rule, the audit record
and the reputation table all see it (issue 7)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.delta import deserialize_delta
from hearthnet.fedlearn.publish import read_adapter
from hearthnet.fedlearn.reputation import EVENT, NEUTRAL
from hearthnet.fedlearn.trainer import QLoRATrainer, TrainResult

from .rounds import CORPUS, start_cluster, stop_cluster, wait_status
from .test_rounds import _announce, _join, _result

pytestmark = pytest.mark.timeout(600)

ATTACK_SCALE = 20.0


@pytest.fixture
def dave_scales_his_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dave trains for real on his own text, then submits his delta × 20 (a scaling attack).
    He is told apart by his private text, which only his node reads."""
    real = QLoRATrainer.train

    def train(self: QLoRATrainer, manifest, samples, **kw) -> TrainResult:  # type: ignore[no-untyped-def]
        result = real(self, manifest, samples, **kw)
        if any(CORPUS["dave"][:20] in s for s in samples):
            scaled = {k: v * ATTACK_SCALE for k, v in result.delta.items()}
            return dataclasses.replace(result, delta=scaled)
        return result

    monkeypatch.setattr(QLoRATrainer, "train", train)


async def _round_of_three(c, aggregation):
    """bob, carol and dave train a round alice coordinates; (result, ids, audit by NodeID)."""
    ann = await _announce(
        c,
        aggregation=aggregation,
        min_participants=3,
        max_participants=3,
        deadline_in_s=90,
        clip_norm=0.0,
    )
    await _join(c, ["bob", "carol", "dave"], ann.round_id)
    status = await wait_status(c, "alice", ann.round_id, 120)
    assert status.phase == "completed", status.abort
    result = _result(status)
    ids = {name: c[name].node_id for name in ("alice", "bob", "carol", "dave")}
    return result, ids, {a.participant: a for a in result.audit}


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
async def test_a_scaled_delta_is_excluded_audited_and_costs_reputation(
    tmp_path, tiny_model_dir, dave_scales_his_delta, rule
):
    names = ["alice", "bob", "carol", "dave"]
    c = await start_cluster(
        tmp_path, names, tiny_model_dir, fedlearn={"reputation_ban_threshold": 0.4}
    )
    try:
        params = {"beta": 0.34} if rule == "trimmed_mean" else {}
        result, ids, audit = await _round_of_three(c, {"rule": rule, "params": params})
        assert result.rule == rule and set(audit) == {ids["bob"], ids["carol"], ids["dave"]}
        assert audit[ids["dave"]].action == "excluded"
        assert audit[ids["dave"]].deviation > 3.0
        for honest in ("bob", "carol"):
            assert audit[ids[honest]].action != "excluded"
            assert audit[ids[honest]].deviation < 3.0

        # The aggregate lies inside the honest participants' values, coordinate by coordinate:
        # dave's update had no pull beyond them.
        adapter, _ = read_adapter(c["alice"].blobs.get(result.aggregated_delta_sha))
        deltas = {}
        for name in ("bob", "carol", "dave"):
            member = c[name].fedlearn.participant.members[result.round_id]
            deltas[name] = deserialize_delta(c[name].blobs.get(member.trained_sha))[0]
        for key in deltas["bob"]:
            lo = torch.minimum(deltas["bob"][key], deltas["carol"][key])
            hi = torch.maximum(deltas["bob"][key], deltas["carol"][key])
            assert bool((adapter[key] >= lo).all()) and bool((adapter[key] <= hi).all()), key
        assert any(float(deltas["dave"][k].abs().max()) > 0 for k in deltas["dave"])

        # Alice's reputation table: dave penalised, bob and carol rewarded; one event each.
        table = c["alice"].fedlearn.ctx.reputation
        assert table.score(ids["dave"]) < NEUTRAL < table.score(ids["bob"])
        assert table.banned(ids["dave"])  # 0.35 < the 0.4 ban threshold configured here
        events = await c["alice"].eventlog.read_all(EVENT)
        assert sorted(e.payload["participant"] for e in events) == sorted(
            ids[n] for n in ("bob", "carol", "dave")
        )
        rows = (await c.call("alice", "reputation")).participants
        assert [r.participant for r in rows][-1] == ids["dave"] and rows[-1].banned

        # Next round: dave is banned here; a min_reputation above neutral refuses carol, who
        # has one reward (0.55), only when it is set above her score.
        ann2 = await _announce(c, min_participants=2, deadline_in_s=60, min_reputation=0.56)
        with pytest.raises(HearthnetError) as exc:
            await _join(c, ["dave"], ann2.round_id)
        assert exc.value.code is ErrorCode.REPUTATION_TOO_LOW
        with pytest.raises(HearthnetError) as exc:
            await _join(c, ["carol"], ann2.round_id)
        assert exc.value.code is ErrorCode.REPUTATION_TOO_LOW
        assert "min_reputation" in exc.value.message

        # The table survives a restart: it is rebuilt from the log.
        before = {p: table.score(p) for p in table.standings}
        await c["alice"].stop()
        await c["alice"].start()
        rebuilt = c["alice"].fedlearn.ctx.reputation
        assert rebuilt is not table and {p: rebuilt.score(p) for p in rebuilt.standings} == before
        assert rebuilt.banned(ids["dave"])
    finally:
        await stop_cluster(c)


async def test_a_clipped_delta_is_audited_clipped_and_costs_reputation(
    tmp_path, tiny_model_dir, dave_scales_his_delta
):
    names = ["alice", "bob", "carol", "dave"]
    c = await start_cluster(tmp_path, names, tiny_model_dir)
    try:
        clip = {"rule": "fedavg", "params": {"norm_bound": 2.0}}  # clip mode
        _, ids, audit = await _round_of_three(c, clip)
        assert audit[ids["dave"]].action == "clipped"
        assert "clipped to 2×" in audit[ids["dave"]].reason
        assert audit[ids["dave"]].deviation > 3.0  # measured on his unclipped update
        assert [audit[ids[n]].action for n in ("bob", "carol")] == ["kept", "kept"]
        table = c["alice"].fedlearn.ctx.reputation  # penalised through his deviation
        assert table.score(ids["dave"]) < NEUTRAL < table.score(ids["bob"])
    finally:
        await stop_cluster(c)
