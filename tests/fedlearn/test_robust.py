"""Robust rules against straightforward references, their tolerance bounds, and determinism."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.robust import aggregate, run_rule
from hearthnet.fedlearn.aggregation.robust_ops import TensorUpdates, krum_scores
from hearthnet.fedlearn.rules.spec import RuleSpec
from tests.helpers import raises_code


def _updates(seed: int, n: int, shape: tuple[int, ...] = (7, 11)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i % 3) for i in range(n)]


def _grid(xs: list[torch.Tensor]) -> float:
    """The exact mean's documented error bound (`exact.py`): values are rounded onto a 2^-22 grid
    below the largest |value|, so a mean may differ from float64 by up to that much."""
    return 2.0**-22 * max(float(x.abs().max()) for x in xs)


# --- references: the textbook definitions, in float64 -----------------------------------------


def ref_trimmed_mean(xs: list[torch.Tensor], beta: float, w: list[int]) -> torch.Tensor:
    n = len(xs)
    k = math.floor(beta * n)
    stack = torch.stack([x.double() for x in xs]).reshape(n, -1)
    weights = torch.tensor(w, dtype=torch.float64)
    order = torch.argsort(stack, dim=0, stable=True)
    kept = order[k : n - k]
    vals = torch.gather(stack, 0, kept)
    ws = weights[kept]
    return ((vals * ws).sum(0) / ws.sum(0)).float().reshape(xs[0].shape)


def ref_median(xs: list[torch.Tensor]) -> torch.Tensor:
    stack = torch.stack([x.double() for x in xs])
    return torch.from_numpy(np.median(stack.numpy(), axis=0)).float()


def ref_krum(xs: list[torch.Tensor], f: int, m: int) -> list[int]:
    flat = torch.stack([x.double().reshape(-1) for x in xs])
    d = torch.cdist(flat, flat) ** 2
    n = len(xs)
    scores = [
        sum(sorted(d[i, j].item() for j in range(n) if j != i)[: n - f - 2]) for i in range(n)
    ]
    return sorted(sorted(range(n), key=lambda i: (scores[i], i))[:m])


def ref_geometric_median(xs: list[torch.Tensor], w: list[int], iters: int = 2000) -> torch.Tensor:
    pts = np.stack([x.double().reshape(-1).numpy() for x in xs])
    wt = np.array(w, dtype=np.float64)
    z = (pts * wt[:, None]).sum(0) / wt.sum()
    for _ in range(iters):
        d = np.maximum(np.linalg.norm(pts - z, axis=1), 1e-18)
        c = wt / d
        z = (pts * c[:, None]).sum(0) / c.sum()
    return torch.from_numpy(z).float().reshape(xs[0].shape)


# --- each rule against its reference ----------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(5, 20), beta=st.sampled_from([0.1, 0.2, 0.3]))
def test_trimmed_mean_matches_reference(seed: int, n: int, beta: float) -> None:
    xs = _updates(seed, n)
    if math.floor(beta * n) < 1:
        n = math.ceil(1 / beta)
        xs = _updates(seed, n)
    w = [1 + (seed >> i) % 5 for i in range(n)]
    out = aggregate("trimmed_mean", xs, w, beta=beta)
    torch.testing.assert_close(out, ref_trimmed_mean(xs, beta, w), rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(3, 21))
def test_median_matches_reference(seed: int, n: int) -> None:
    xs = _updates(seed, n)
    torch.testing.assert_close(aggregate("median", xs), ref_median(xs), rtol=1e-6, atol=1e-7)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(5, 16), f=st.integers(1, 3))
def test_krum_and_multi_krum_select_as_the_reference(seed: int, n: int, f: int) -> None:
    if n < 2 * f + 3:
        n = 2 * f + 3
    xs = _updates(seed, n)
    (chosen,) = ref_krum(xs, f, 1)
    assert torch.equal(aggregate("krum", xs, f=f), xs[chosen])  # the update itself, bit for bit
    m = max(1, n - f - 1)
    picked = ref_krum(xs, f, m)
    expected = torch.stack([xs[i].double() for i in picked]).mean(0).float()
    torch.testing.assert_close(
        aggregate("multi_krum", xs, f=f, m=m), expected, rtol=1e-5, atol=_grid(xs)
    )


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(3, 12))
@example(seed=1170, n=4)  # the median is a data point; plain Weiszfeld stalled 1.8e-3 short
def test_geometric_median_matches_reference(seed: int, n: int) -> None:
    xs = _updates(seed, n, (40,))
    w = [1 + (seed >> i) % 3 for i in range(n)]
    f = max(0, (n - 1) // 2 - 1)
    heavy = sum(sorted(w, reverse=True)[:f])
    if f and 2 * heavy >= sum(w):
        f = 0
    out = aggregate("geometric_median", xs, w, f=f, max_iter=1000, tol=1e-9)
    ref = ref_geometric_median(xs, w)
    scale = float(torch.stack(xs).double().norm(dim=1).median())
    assert float((out.double() - ref.double()).norm()) <= 1e-4 * scale


def _objective(xs: list[torch.Tensor], w: list[int], z: torch.Tensor) -> float:
    pts = np.stack([x.double().reshape(-1).numpy() for x in xs])
    return float(
        (np.array(w, dtype=np.float64) * np.linalg.norm(pts - z.double().numpy(), axis=1)).sum()
    )


def test_geometric_median_on_a_data_point_is_that_point() -> None:
    """The example that failed: weights 1, 1, 2, 3 and the optimum at the heaviest update, where
    Weiszfeld with rounded coefficients stopped at objective 63.156014 instead of 63.155978."""
    xs = _updates(1170, 4, (40,))
    w = [1, 1, 2, 3]
    pts = np.stack([x.double().numpy() for x in xs])
    pull = sum(w[i] * (pts[i] - pts[3]) / np.linalg.norm(pts[i] - pts[3]) for i in range(3))
    assert 0.9 * w[3] < float(np.linalg.norm(pull)) < w[3]  # the optimality test, in float64
    best = min(_objective(xs, w, ref_geometric_median(xs, w)), _objective(xs, w, xs[3]))
    out = aggregate("geometric_median", xs, w, f=0)
    assert _objective(xs, w, out) <= best * (1 + 1e-9)
    assert torch.equal(out, xs[3])  # the update itself, bit for bit
    order = [2, 3, 0, 1]
    again = aggregate("geometric_median", [xs[i] for i in order], [w[i] for i in order], f=0)
    assert again.numpy().tobytes() == out.numpy().tobytes()
    audit = run_rule(RuleSpec.parse("geometric_median", {"f": 0}), TensorUpdates(xs), w)
    assert audit.verdicts[3].reason == "the median is this update"


def test_geometric_median_leaves_a_data_point_it_starts_on() -> None:
    """The weighted mean is exactly x0 = 0, which is not the median: plain Weiszfeld divides by
    a zero distance and stays there; the Vardi–Zhang step moves on to (1 − 1/√3, 0)."""
    plane = [(0.0, 0.0), (1.0, 1.0), (1.0, -1.0), (-4.0, 0.0)]
    w = [1, 2, 2, 1]
    xs = [torch.zeros(40) for _ in plane]
    for x, (a, b) in zip(xs, plane, strict=True):
        x[0], x[1] = a, b
    expected = torch.zeros(40, dtype=torch.float64)
    expected[0] = 1 - 1 / math.sqrt(3)
    out = aggregate("geometric_median", xs, w, f=0, tol=1e-9)
    assert _objective(xs, w, out) <= _objective(xs, w, expected) * (1 + 1e-9)
    assert float((out.double() - expected).norm()) < 4 * _grid(xs)  # each step is on the grid


def test_fedavg_is_the_weighted_mean() -> None:
    xs = _updates(3, 6)
    w = [1, 2, 3, 4, 5, 6]
    expected = sum(x.double() * wi for x, wi in zip(xs, w, strict=True)) / sum(w)
    torch.testing.assert_close(
        aggregate("fedavg", xs, w), expected.float(), rtol=1e-5, atol=_grid(xs)
    )


def test_norm_bound_clips_or_drops_long_updates() -> None:
    xs = _updates(5, 7)
    xs[2] = xs[2] * 100.0
    norms = [float(x.double().norm()) for x in xs]
    bound = 2.0 * float(np.median(norms))
    clipped = [x * (bound / nx) if nx > bound else x for x, nx in zip(xs, norms, strict=True)]
    expected = torch.stack([x.double() for x in clipped]).mean(0).float()
    out = aggregate("fedavg", xs, norm_bound=2.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=_grid(clipped))
    dropped = aggregate("fedavg", xs, norm_bound=2.0, norm_action="drop")
    kept = [x for i, x in enumerate(xs) if i != 2]
    expected = torch.stack([x.double() for x in kept]).mean(0).float()
    torch.testing.assert_close(dropped, expected, rtol=1e-5, atol=_grid(kept))


# --- attackers within the bound stay within the honest range ----------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    honest=st.integers(4, 14),
    attack=st.sampled_from(["huge", "signflip", "inside_edge", "mixed"]),
)
def test_coordinatewise_rules_stay_in_the_honest_range(seed: int, honest: int, attack: str) -> None:
    rng = random.Random(seed)
    beta = 0.3
    f = 0  # the most attackers trimmed mean (β = 0.3) tolerates next to these honest ones
    while math.floor(beta * (honest + f + 1)) >= f + 1:
        f += 1
    n = honest + f
    hs = _updates(seed, honest, (50,))
    lo = torch.stack(hs).min(0).values
    hi = torch.stack(hs).max(0).values
    attackers = []
    for j in range(f):
        if attack == "huge":
            attackers.append(torch.full((50,), 1e30 * (1 if j % 2 else -1)))
        elif attack == "signflip":
            attackers.append(-20.0 * hs[j % honest])
        elif attack == "inside_edge":
            attackers.append(hi.clone())
        else:
            attackers.append(torch.tensor([rng.choice([-1e6, 1e6, 0.0]) for _ in range(50)]))
    xs = hs + attackers
    rng.shuffle(xs)
    w = [rng.randint(1, 4) for _ in range(n)]
    for out in (aggregate("trimmed_mean", xs, w, beta=beta), aggregate("median", xs, f=f)):
        assert bool((out >= lo).all()) and bool((out <= hi).all())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), f=st.integers(1, 3), scale=st.sampled_from([-20.0, 20.0, 1e6]))
@example(seed=629133, f=3, scale=-20.0)  # once failed a tolerance tighter than the grid bound
def test_krum_picks_an_honest_update_against_far_attackers(seed: int, f: int, scale: float) -> None:
    honest = _updates(seed, f + 3, (64,))  # n = 2f + 3
    attackers = [h * scale for h in honest[:f]]
    xs = honest + attackers
    out = aggregate("krum", xs, f=f)
    assert any(torch.equal(out, h) for h in honest)
    multi = aggregate("multi_krum", xs, f=f, m=len(honest))
    expected = torch.stack([h.double() for h in honest]).mean(0).float()
    torch.testing.assert_close(multi, expected, rtol=1e-5, atol=_grid(honest))


# --- refusals beyond the bound ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "n", "params", "weights"),
    [
        ("trimmed_mean", 4, {"beta": 0.2}, None),  # ⌊0.2·4⌋ = 0: trims nothing
        ("median", 2, {}, None),
        ("median", 6, {"f": 3}, None),  # needs 7
        ("krum", 6, {"f": 2}, None),  # needs 2f + 3 = 7
        ("multi_krum", 7, {"f": 2, "m": 6}, None),  # m ≤ n − f = 5
        ("geometric_median", 5, {"f": 1}, [1, 1, 1, 1, 5]),  # one node holds over half
        ("geometric_median", 4, {"f": 2}, None),  # needs 5
        ("fedavg", 2, {"norm_bound": 2.0}, None),  # a median norm needs 3
    ],
)
def test_inputs_beyond_the_bound_are_refused(
    rule: str, n: int, params: dict[str, object], weights: list[int] | None
) -> None:
    with pytest.raises(HearthnetError) as err:
        aggregate(rule, _updates(1, n), weights, **params)
    assert err.value.code is ErrorCode.FEDLEARN_TOLERANCE_EXCEEDED


@pytest.mark.parametrize(
    ("rule", "params"),
    [
        ("bulyan", {}),
        ("trimmed_mean", {"beta": 0.5}),
        ("trimmed_mean", {"f": 1}),
        ("krum", {"f": -1}),
        ("krum", {"f": 1.5}),
        ("multi_krum", {"m": 0}),
        ("geometric_median", {"max_iter": 0}),
        ("geometric_median", {"tol": 2.0}),
        ("median", {"norm_bound": 0.5}),
        ("median", {"norm_action": "shrink"}),
        ("fedavg", {"reputation_weighted": "yes"}),
    ],
)
def test_bad_rule_parameters_are_manifest_invalid(rule: str, params: dict[str, object]) -> None:
    with pytest.raises(HearthnetError) as err:
        RuleSpec.parse(rule, params)
    assert err.value.code is ErrorCode.MANIFEST_INVALID


def test_non_finite_or_mismatched_updates_fail() -> None:
    xs = _updates(2, 6)
    xs[3][0, 0] = float("nan")
    with pytest.raises(HearthnetError) as err:
        aggregate("median", xs)
    assert err.value.code is ErrorCode.FEDLEARN_AGGREGATION_FAILED
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED):
        aggregate("median", [*_updates(2, 5), torch.zeros(3)])


def test_minimum_n_is_what_check_accepts() -> None:
    for rule, params in [
        ("trimmed_mean", {"beta": 0.2}),
        ("trimmed_mean", {"beta": 0.3}),
        ("median", {"f": 2}),
        ("krum", {"f": 2}),
        ("multi_krum", {"f": 1}),
        ("geometric_median", {"f": 2}),
    ]:
        spec = RuleSpec.parse(rule, params)
        spec.check(spec.minimum_n())
        with raises_code(ErrorCode.FEDLEARN_TOLERANCE_EXCEEDED):
            spec.check(spec.minimum_n() - 1)


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "params"),
    [
        ("fedavg", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("median", {}),
        ("krum", {"f": 2}),
        ("multi_krum", {"f": 2, "m": 4}),
        ("geometric_median", {"f": 1}),
        ("trimmed_mean", {"beta": 0.2, "norm_bound": 1.5}),
        ("median", {"norm_bound": 1.5, "norm_action": "drop"}),
    ],
)
def test_same_inputs_in_any_order_give_the_same_bytes(rule: str, params: dict[str, object]) -> None:
    xs = _updates(11, 9, (33, 17))
    xs[0][0, 0] = 0.0  # signed zeros and exact ties must not depend on order either
    xs[1][0, 0] = -0.0
    xs[2][1, 1] = xs[3][1, 1]
    w = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    first = aggregate(rule, xs, w, **params)
    rng = random.Random(7)
    for _ in range(4):
        order = list(range(9))
        rng.shuffle(order)
        again = aggregate(rule, [xs[i] for i in order], [w[i] for i in order], **params)
        assert again.numpy().tobytes() == first.numpy().tobytes()


def test_krum_ties_go_to_the_earlier_participant() -> None:
    base = torch.zeros(8)
    xs = [base + 1.0, base - 1.0, base + 1.0, base - 1.0, base + 1.0, base - 1.0, base]
    # x[0] ... x[5] are pairwise symmetric around x[6]; give x[6] a far twin so it scores worse
    xs[6] = base + 50.0
    scores = krum_scores(np.array([[float((a - b).pow(2).sum()) for b in xs] for a in xs]), 1)
    assert scores[0] == scores[2] == scores[4]
    assert torch.equal(aggregate("krum", xs, f=1), xs[0])
    assert torch.equal(aggregate("krum", [xs[1], *xs[:1], *xs[2:]], f=1), xs[1])


def test_audit_names_what_each_rule_did() -> None:
    xs = _updates(4, 8, (64,))
    xs[5] = xs[5] * 40.0
    u = TensorUpdates(xs)
    tm = run_rule(RuleSpec.parse("trimmed_mean", {"beta": 0.25}), u, [1] * 8)
    assert tm.verdicts[5].action == "excluded"
    assert all(v.action != "excluded" for i, v in enumerate(tm.verdicts) if i != 5)
    assert (
        tm.verdicts[5].deviation
        > 3.0
        > max(v.deviation for i, v in enumerate(tm.verdicts) if i != 5)
    )
    kr = run_rule(RuleSpec.parse("multi_krum", {"f": 2, "m": 5}), u, [1] * 8)
    assert kr.verdicts[5].action == "excluded" and "not selected" in kr.verdicts[5].reason
    assert sum(v.action == "kept" for v in kr.verdicts) == 5
    nb = run_rule(RuleSpec.parse("fedavg", {"norm_bound": 3.0, "norm_action": "drop"}), u, [1] * 8)
    assert nb.verdicts[5].action == "excluded" and "norm" in nb.verdicts[5].reason
    gm = run_rule(RuleSpec.parse("geometric_median", {"f": 2}), u, [1] * 8)
    assert gm.verdicts[5].action == "excluded"


def test_clip_mode_says_clipped_for_every_attacker_it_clipped() -> None:
    xs = _updates(4, 8, (64,))
    for i in (1, 5, 6):  # three attackers, all far outside the bound
        xs[i] = xs[i] * 40.0
    u = TensorUpdates(xs)
    fa = run_rule(RuleSpec.parse("fedavg", {"norm_bound": 2.0}), u, [1] * 8)
    actions = [v.action for v in fa.verdicts]
    assert actions == ["kept", "clipped", "kept", "kept", "kept", "clipped", "clipped", "kept"]
    assert all("clipped to 2×" in fa.verdicts[i].reason for i in (1, 5, 6))
    # a rule that then excludes a clipped update reports it excluded; one that keeps part of
    # it still says clipped, never down_weighted
    tm = run_rule(RuleSpec.parse("trimmed_mean", {"beta": 0.25, "norm_bound": 2.0}), u, [1] * 8)
    for i in (1, 5, 6):
        assert tm.verdicts[i].action in ("clipped", "excluded"), tm.verdicts[i]
        assert tm.verdicts[i].reason.startswith("norm ")
    assert all(v.action != "clipped" for i, v in enumerate(tm.verdicts) if i not in (1, 5, 6))
    drop = run_rule(
        RuleSpec.parse("fedavg", {"norm_bound": 2.0, "norm_action": "drop"}), u, [1] * 8
    )
    assert [v.action for v in drop.verdicts].count("excluded") == 3


def test_cosine_krum_selects_as_the_reference_and_sees_ipm_attackers() -> None:
    g = torch.Generator().manual_seed(3)
    common = torch.randn(200, generator=g)
    honest = [common + 0.8 * torch.randn(200, generator=g) for _ in range(7)]
    mu = torch.stack(honest).mean(0)
    ipm = [-0.1 * mu for _ in range(3)]  # short, pointing against the honest mean
    xs = honest + ipm
    flat = torch.stack([x.double() for x in xs])
    unit = flat / flat.norm(dim=1, keepdim=True)
    dist = 1.0 - unit @ unit.T
    n, f = 10, 3
    scores = [sorted(dist[i, j].item() for j in range(n) if j != i)[: n - f - 2] for i in range(n)]
    ref = sorted(sorted(range(n), key=lambda i: (sum(scores[i]), i))[:7])
    assert ref == list(range(7))  # the reference sees them too
    out = aggregate("multi_krum", xs, f=f, metric="cosine")
    expected = torch.stack([x.double() for x in honest]).mean(0).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=_grid(xs))
    # Euclidean Krum prefers the short colluding updates: they are the most central
    euclid = aggregate("multi_krum", xs, f=f)
    assert float((euclid - expected).norm()) > 0.2 * float(expected.norm())


def test_thread_count_does_not_change_a_bit() -> None:
    import numba

    xs = _updates(21, 9, (300, 50))  # several chunks, so threads split the work
    rules = [
        ("trimmed_mean", {"beta": 0.2}),
        ("median", {}),
        ("multi_krum", {"f": 2, "metric": "cosine"}),
        ("geometric_median", {"f": 1}),
    ]
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, before):
            numba.set_num_threads(threads)
            results.append([aggregate(r, xs, **p).numpy().tobytes() for r, p in rules])
    finally:
        numba.set_num_threads(before)
    assert results[0] == results[1]
