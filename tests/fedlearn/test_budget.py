"""The privacy budget (hearthnet/fedlearn/budget.py; README.md, "Privacy budget"): ε per round
from dp-accounting, RDP composition per topic, the join refusals, and a real node that refuses
a second round on a topic once its budget is spent."""

import math

import dp_accounting
import pytest
from dp_accounting import rdp

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn import budget
from hearthnet.fedlearn.privacy import round_epsilon as privacy_round_epsilon
from tests.helpers import raises_code

from .rounds import small_draft, start_cluster, stop_cluster

DELTA = 1e-5


def _direct(sigma: float, rounds: int, delta: float = DELTA) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(sigma), rounds)
    return float(acc.get_epsilon(delta))


def test_round_epsilon_matches_dp_accounting(make_manifest):
    m = make_manifest(dp_noise_scale=2.0, clip_norm=0.5, clip_policy="fixed").manifest
    assert budget.noise_multiplier(m) == 4.0
    eps = budget.round_epsilon(m, DELTA)
    assert eps == pytest.approx(_direct(4.0, 1))
    assert eps == pytest.approx(privacy_round_epsilon(2.0, 0.5, DELTA))
    assert budget.round_epsilon(m, 1e-3) < eps  # a larger δ buys a smaller ε


def test_a_round_without_dp_is_infinite(make_manifest):
    m = make_manifest(dp_noise_scale=0.0).manifest
    assert budget.noise_multiplier(m) is None
    assert budget.round_epsilon(m, DELTA) == math.inf
    assert budget.wire_epsilon(math.inf) is None and budget.show(None) == "∞ (no DP)"


def test_two_rounds_compose_to_more_than_one_and_less_than_twice(make_manifest):
    a = make_manifest(dp_noise_scale=1.0, clip_norm=1.0, clip_policy="fixed").manifest
    b = make_manifest(dp_noise_scale=1.0, clip_norm=1.0, clip_policy="fixed").manifest
    ledger = budget.fold_ledger([(a.round_id, a)])
    one = ledger[a.topic].epsilon(DELTA)
    two = budget.after_join(ledger, b, DELTA)
    assert one < two < 2 * one  # RDP composition beats adding ε
    assert two == pytest.approx(_direct(1.0, 2))
    assert budget.after_join(ledger, a, DELTA) == pytest.approx(one)  # a round counts once
    other = make_manifest(
        dp_noise_scale=1.0, clip_norm=1.0, clip_policy="fixed", topic="other"
    ).manifest
    assert budget.after_join(ledger, other, DELTA) == pytest.approx(one)  # per topic
    no_dp = make_manifest(dp_noise_scale=0.0).manifest
    assert (
        budget.fold_ledger([(a.round_id, a), (no_dp.round_id, no_dp)])[a.topic].epsilon(DELTA)
        == math.inf
    )


def test_budget_refuses_the_round_that_would_exceed_it(make_manifest):
    a = make_manifest(dp_noise_scale=1.0, clip_norm=1.0, clip_policy="fixed").manifest
    b = make_manifest(dp_noise_scale=1.0, clip_norm=1.0, clip_policy="fixed").manifest
    limit = (_direct(1.0, 1) + _direct(1.0, 2)) / 2
    assert budget.check_join({}, a, DELTA, limit, False) == pytest.approx(_direct(1.0, 1))
    ledger = budget.fold_ledger([(a.round_id, a)])
    with raises_code(ErrorCode.PRIVACY_BUDGET_EXCEEDED) as exc:
        budget.check_join(ledger, b, DELTA, limit, False)
    assert "dp_epsilon_budget" in exc.value.message and f"{limit:g}" in exc.value.message
    assert budget.check_join(ledger, b, DELTA, None, False) > 0  # no budget: unlimited
    no_dp = make_manifest(dp_noise_scale=0.0).manifest
    with raises_code(ErrorCode.PRIVACY_BUDGET_EXCEEDED):
        budget.check_join({}, no_dp, DELTA, 100.0, False)  # ∞ exceeds any budget


def test_require_dp_refuses_a_round_without_noise(make_manifest):
    no_dp = make_manifest(dp_noise_scale=0.0).manifest
    assert budget.check_join({}, no_dp, DELTA, None, False) == math.inf
    with raises_code(ErrorCode.PRIVACY_BUDGET_EXCEEDED) as exc:
        budget.check_join({}, no_dp, DELTA, None, True)
    assert "require_dp" in exc.value.message
    dp = make_manifest(dp_noise_scale=1.0, clip_norm=1.0, clip_policy="fixed").manifest
    assert budget.check_join({}, dp, DELTA, None, True) < math.inf


async def test_a_node_refuses_a_second_round_once_its_budget_is_spent(tmp_path, tiny_model_dir):
    limit = (_direct(1.0, 1) + _direct(1.0, 2)) / 2
    c = await start_cluster(
        tmp_path, ["alice", "bob"], tiny_model_dir, fedlearn={"dp_epsilon_budget": limit}
    )
    dp = {"dp_noise_scale": 1.0, "clip_norm": 1.0, "clip_policy": "fixed"}
    try:
        first = await c.call("alice", "round.announce", {"draft": small_draft(**dp)})
        seen = await c.call("bob", "privacy", {})
        [offer] = seen.offers
        assert offer.epsilon == pytest.approx(_direct(1.0, 1)) and offer.refusal is None
        await c.call("bob", "round.join", {"round_id": first.round_id, "consent": True}, timeout=60)
        [joined] = await c["bob"].eventlog.read_all("fedlearn.participant.joined")
        assert joined.payload["topic"] == "village"
        assert joined.payload["epsilon"] == pytest.approx(_direct(1.0, 1))

        second = await c.call("alice", "round.announce", {"draft": small_draft(**dp)})
        seen = await c.call("bob", "privacy", {})
        [topic] = seen.topics
        assert topic.rounds == [first.round_id]
        assert topic.epsilon == pytest.approx(_direct(1.0, 1))
        [offer] = seen.offers
        assert offer.topic_epsilon_after == pytest.approx(_direct(1.0, 2))
        assert offer.refusal is not None and "dp_epsilon_budget" in offer.refusal
        with pytest.raises(HearthnetError) as exc:
            await c.call(
                "bob", "round.join", {"round_id": second.round_id, "consent": True}, timeout=60
            )
        assert exc.value.code is ErrorCode.PRIVACY_BUDGET_EXCEEDED
        assert len(await c["bob"].eventlog.read_all("fedlearn.participant.joined")) == 1
    finally:
        await stop_cluster(c)
