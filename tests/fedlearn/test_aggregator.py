import hashlib
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.aggregator import FedAvgAggregator
from hearthnet.fedlearn.aggregation.exact import exact_weighted_mean
from hearthnet.fedlearn.delta import serialize_delta
from hearthnet.fedlearn.lora import derive_lora_a
from hearthnet.fedlearn.submission import ParticipantSubmission, capped_weights
from hearthnet.identity import NodeIdentity
from tests.helpers import raises_code

from .conftest import MODEL_SHAPES, random_delta

PARTICIPANTS = [NodeIdentity.generate() for _ in range(6)]


def _submission(signed, ident, delta, num_samples):
    data = serialize_delta(
        delta, manifest_sha=signed.manifest_sha, round_id=signed.round_id, participant=ident.node_id
    )
    return ParticipantSubmission.create(ident, signed.round_id, data, num_samples, 0.5)


def _aggregate(signed, entries, threads=None):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        agg = FedAvgAggregator(signed.manifest, MODEL_SHAPES)
        for sub, delta in entries:
            agg.add(sub, delta)
        return agg.aggregate()
    finally:
        torch.set_num_threads(before)


def _sha(tensors):
    return hashlib.sha256(
        serialize_delta(tensors, manifest_sha="0" * 64, round_id="r", participant="p")
    ).hexdigest()


def _entries(signed, n=4, samples=(10, 20, 30, 15, 25, 12), scale=0.01):
    out = []
    for i in range(n):
        delta = random_delta(signed, 100 + i, scale=scale * (i + 1))
        out.append((_submission(signed, PARTICIPANTS[i], delta, samples[i]), delta))
    return out


def test_fedavg_weighted_arithmetic(make_manifest):
    signed = make_manifest(lora_aggregation="fedavg_ab")
    entries = _entries(signed)
    result = _aggregate(signed, entries)
    total = sum(s.num_samples for s, _ in entries)
    for key in entries[0][1]:
        reference = sum(d[key].double() * s.num_samples for s, d in entries) / total
        torch.testing.assert_close(result[key].double(), reference, rtol=1e-3, atol=1e-5)
        # The documented bound: half a grid step of the largest input, plus float32 rounding.
        largest = max(float(d[key].abs().max()) for _, d in entries)
        bound = largest * 2.0**-C.FEDLEARN_AGG_GRID_BITS + float(reference.abs().max()) * 2**-24
        assert (result[key].double() - reference).abs().max() <= bound


@pytest.mark.parametrize("mode", ["frozen_a", "fedavg_ab", "product_svd"])
def test_deterministic_across_order_and_threads(make_manifest, mode):
    signed = make_manifest(lora_aggregation=mode)
    entries = _entries(signed, n=5)
    reference = _sha(_aggregate(signed, entries, threads=1))
    for seed in range(3):
        shuffled = entries[:]
        random.Random(seed).shuffle(shuffled)
        assert _sha(_aggregate(signed, shuffled, threads=2)) == reference
    assert _sha(_aggregate(signed, entries, threads=1)) == reference


def test_frozen_a_equals_mean_of_products(make_manifest):
    signed = make_manifest()  # frozen_a
    entries = _entries(signed, n=4)
    result = _aggregate(signed, entries)
    weights = [s.num_samples for s, _ in entries]
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        a = derive_lora_a(signed.manifest.seed, path, 4, 32)
        assert torch.equal(result[path + ".lora_A"], a)
        products = sum(
            d[path + ".lora_B"].double() @ a.double() * w
            for (_, d), w in zip(entries, weights, strict=True)
        ) / sum(weights)
        torch.testing.assert_close(
            result[path + ".lora_B"].double() @ result[path + ".lora_A"].double(),
            products,
            rtol=1e-5,
            atol=1e-7,
        )


def test_product_svd_recovers_mean_product(make_manifest):
    signed = make_manifest(lora_aggregation="product_svd")
    path = "model.layers.0.self_attn.q_proj"
    gen = torch.Generator().manual_seed(0)
    shared_a = torch.randn(4, 32, generator=gen) * 0.1
    entries = []
    for i in range(3):
        delta = random_delta(signed, 200 + i)
        for p in (
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ):
            delta[p + ".lora_A"] = shared_a.clone()
        entries.append((_submission(signed, PARTICIPANTS[i], delta, 10 * (i + 1)), delta))
    result = _aggregate(signed, entries)
    weights = [10, 20, 30]
    mean_product = (
        sum(
            d[path + ".lora_B"].double() @ shared_a.double() * w
            for (_, d), w in zip(entries, weights, strict=True)
        )
        / 60
    )
    # With a shared A the mean product has rank <= r, so the truncation loses nothing.
    got = result[path + ".lora_B"].double() @ result[path + ".lora_A"].double()
    torch.testing.assert_close(got, mean_product, rtol=1e-4, atol=1e-6)
    # Sign convention: each column of B' has its largest-|entry| positive.
    b = result[path + ".lora_B"]
    pivots = b.abs().argmax(dim=0)
    assert (b[pivots, torch.arange(4)] > 0).all()


def test_product_svd_beats_naive_fedavg_ab(make_manifest):
    naive = make_manifest(lora_aggregation="fedavg_ab")
    exact = make_manifest(lora_aggregation="product_svd")
    path = "model.layers.0.self_attn.q_proj"
    entries_n, entries_e = _entries(naive, n=4), _entries(exact, n=4)
    weights = [s.num_samples for s, _ in entries_n]
    target = sum(
        d[path + ".lora_B"].double() @ d[path + ".lora_A"].double() * w
        for (_, d), w in zip(entries_n, weights, strict=True)
    ) / sum(weights)
    rn, re = _aggregate(naive, entries_n), _aggregate(exact, entries_e)
    err_naive = (rn[path + ".lora_B"].double() @ rn[path + ".lora_A"].double() - target).norm()
    err_svd = (re[path + ".lora_B"].double() @ re[path + ".lora_A"].double() - target).norm()
    assert err_svd < err_naive


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    scale_exp=st.integers(-20, 10),
    seed=st.integers(0, 2**31 - 1),
    weights=st.lists(st.integers(1, 1000), min_size=3, max_size=3),
)
def test_mean_of_identical_inputs_is_the_input(rows, cols, scale_exp, seed, weights):
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(rows, cols, generator=gen) * 2.0**scale_exp
    out = exact_weighted_mean([d, d.clone(), d.clone()], weights)
    bound = float(d.abs().max()) * 2.0**-(C.FEDLEARN_AGG_GRID_BITS)
    assert (out - d).abs().max() <= bound
    assert torch.isfinite(out).all()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 8),
    size=st.integers(1, 500),
    seed=st.integers(0, 2**31 - 1),
    exps=st.lists(st.integers(-126, 120), min_size=8, max_size=8),
)
def test_mean_of_finite_inputs_is_finite_and_bounded(n, size, seed, exps):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(size, generator=gen) * 2.0 ** exps[i] for i in range(n)]
    tensors = [torch.nan_to_num(t, posinf=3e38, neginf=-3e38) for t in tensors]
    out = exact_weighted_mean(tensors, [1] * n)
    assert torch.isfinite(out).all()
    assert float(out.abs().max()) <= max(float(t.abs().max()) for t in tensors) * (1 + 2**-20)


def test_weight_cap():
    assert capped_weights([10, 10, 10]) == [10, 10, 10]
    assert capped_weights([10, 12, 1_000_000]) == [10, 12, 48]  # 4 x lower median (12)
    assert capped_weights([2**30, 2**30, 2**30]) == [C.FEDLEARN_MAX_NUM_SAMPLES] * 3
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED):
        capped_weights([0, 1, 2])


def test_inflated_sample_count_cannot_dominate(make_manifest):
    signed = make_manifest()
    entries = _entries(signed, n=3, samples=(10, 10, 1_000_000))
    result = _aggregate(signed, entries)
    key = "model.layers.0.self_attn.q_proj.lora_B"
    weights = capped_weights([10, 10, 1_000_000])
    expected = sum(d[key].double() * w for (_, d), w in zip(entries, weights, strict=True))
    torch.testing.assert_close(result[key].double(), expected / sum(weights), rtol=1e-5, atol=1e-8)


def test_refusals(make_manifest):
    signed = make_manifest()
    entries = _entries(signed, n=2)
    agg = FedAvgAggregator(signed.manifest, MODEL_SHAPES)
    for sub, delta in entries:
        agg.add(sub, delta)
    with pytest.raises(HearthnetError) as exc:
        agg.aggregate()  # 2 < min_participants 3
    assert exc.value.code is ErrorCode.FEDLEARN_AGGREGATION_FAILED
    with pytest.raises(HearthnetError) as exc:
        agg.add(*entries[0])
    assert exc.value.code is ErrorCode.DELTA_INVALID
    other = make_manifest()
    sub = _submission(other, PARTICIPANTS[5], random_delta(other, 1), 5)
    with raises_code(ErrorCode.DELTA_INVALID):
        agg.add(sub, random_delta(other, 1))
    with pytest.raises(HearthnetError) as exc:
        exact_weighted_mean([torch.tensor([1.0, float("nan")])], [1])
    assert exc.value.code is ErrorCode.FEDLEARN_AGGREGATION_FAILED


def test_derive_lora_a_is_deterministic_and_global_rng_free():
    torch.manual_seed(1)
    a1 = derive_lora_a(7, "model.layers.0.self_attn.q_proj", 8, 576)
    torch.manual_seed(999)
    torch.randn(100)
    a2 = derive_lora_a(7, "model.layers.0.self_attn.q_proj", 8, 576)
    assert torch.equal(a1, a2) and a1.dtype == torch.float32 and a1.shape == (8, 576)
    assert not torch.equal(a1, derive_lora_a(8, "model.layers.0.self_attn.q_proj", 8, 576))
    assert not torch.equal(a1, derive_lora_a(7, "model.layers.1.self_attn.q_proj", 8, 576))
    assert float(a1.abs().max()) <= 1 / 576**0.5
    assert abs(float(a1.mean())) < 0.01 * (1 / 576**0.5) * 10
    # Pinned bits: a change here changes every frozen_a adapter ever published.
    digest = hashlib.sha256(derive_lora_a(1234, "m.q_proj", 4, 32).numpy().tobytes()).hexdigest()
    assert digest == PINNED_A_DIGEST


PINNED_A_DIGEST = "e2065137be0acd2143e4bbb2c21805fef3348f3ea322403b8d4c617d29f0d64b"


def _formula(column, weights):
    """The defining formula, evaluated plainly in float64 (exact: every value is an integer)."""
    from hearthnet.fedlearn.aggregation.exact import grid_shift, max_abs

    shift = grid_shift(max_abs(column))
    if shift is None:
        return torch.zeros(column[0].shape)
    q = [torch.round(t.to(torch.float32).double() * 2.0**shift) for t in column]
    total = sum(w * qi for w, qi in zip(weights, q, strict=True))
    return (total / float(sum(weights)) * 2.0**-shift).float()


def test_every_path_equals_the_formula_bit_for_bit():
    from hearthnet.fedlearn.aggregation.exact import exact_weighted_means

    gen = torch.Generator().manual_seed(3)
    weights = [5, 1, 9, 2]
    big = [torch.randn(1200, 1000, generator=gen) * 10.0 ** (i - 2) for i in range(4)]
    big[1] = big[1].to(torch.float16)
    big[2] = big[2].to(torch.bfloat16)
    assert big[0].numel() > C.FEDLEARN_AGG_CHUNK_ELEMENTS  # windowed path
    assert torch.equal(exact_weighted_mean(big, weights), _formula(big, weights))
    small = [
        [torch.randn(7, 5, generator=gen) * 10.0 ** (k - 3) for _ in range(4)] for k in range(6)
    ]
    small[2] = [torch.zeros(7, 5)] * 4  # an all-zero key
    small[3] = [t * 2.0**-120 for t in small[3]]  # needs the two-step scale
    small[4] = [t.double() for t in small[4]]  # float64 input (product_svd)
    batched = exact_weighted_means(small, weights)
    for col, got in zip(small, batched, strict=True):
        assert torch.equal(got, _formula(col, weights))
        assert torch.equal(got, exact_weighted_mean(col, weights))


class _CountingDelta(dict):
    """Hands out copies and counts how many are alive at once (the aggregator's footprint)."""

    live = 0
    peak = 0

    def __getitem__(self, key):
        import weakref

        tensor = super().__getitem__(key).clone()
        type(self).live += 1
        type(self).peak = max(type(self).peak, type(self).live)
        weakref.finalize(tensor, _CountingDelta._release)
        return tensor

    @staticmethod
    def _release():
        _CountingDelta.live -= 1


def test_aggregation_streams_one_key_at_a_time(make_manifest):
    import gc

    shapes = {f"model.layers.{i}.self_attn.q_proj": (8192, 64) for i in range(4)}
    signed = make_manifest(lora_rank=64, lora_target_modules=("q_proj",))
    gen = torch.Generator().manual_seed(0)
    agg = FedAvgAggregator(signed.manifest, shapes)
    for i in range(3):
        delta = {f"{p}.lora_B": torch.randn(8192, 64, generator=gen) for p in shapes}
        agg.add(_submission(signed, PARTICIPANTS[i], delta, 10), _CountingDelta(delta))
    assert C.FEDLEARN_AGG_CHUNK_ELEMENTS < 8192 * 64  # each key is its own block
    gc.collect()
    _CountingDelta.live = _CountingDelta.peak = 0
    out = agg.aggregate()
    assert len(out) == 8
    assert _CountingDelta.peak <= 3  # one column (3 participants), never all 12 tensors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -float("nan")])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_any_non_finite_value_in_any_key_fails(bad, where):
    from hearthnet.fedlearn.aggregation.exact import exact_weighted_means

    columns = [[torch.randn(5000) for _ in range(3)] for _ in range(3)]
    columns[where][where][4999 - where] = bad
    with pytest.raises(HearthnetError) as exc:
        exact_weighted_means(columns, [1, 2, 3])
    assert exc.value.code is ErrorCode.FEDLEARN_AGGREGATION_FAILED
    columns[where][where][4999 - where] = 3.0e38  # the largest finite values still aggregate
    assert all(bool(torch.isfinite(t).all()) for t in exact_weighted_means(columns, [1, 2, 3]))


# --- robust rules over whole LoRA deltas (issue 7) ---------------------------------------------


def _robust_entries(signed, scale_attacker=50.0, n=5):
    entries = []
    for i, ident in enumerate(PARTICIPANTS[:n]):
        delta = random_delta(signed, 100 + i)
        if i == 0:
            delta = {k: v * scale_attacker for k, v in delta.items()}
        entries.append((_submission(signed, ident, delta, 10), delta))
    return entries


@pytest.mark.parametrize("mode", ["frozen_a", "fedavg_ab", "product_svd"])
@pytest.mark.parametrize(
    ("rule", "params"),
    [
        ("median", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("krum", {"f": 1}),
        ("multi_krum", {"f": 1, "m": 3}),
        ("geometric_median", {"f": 1}),
        ("fedavg", {"norm_bound": 2.0, "norm_action": "drop"}),
    ],
)
def test_robust_rules_exclude_a_scaled_delta_in_every_lora_mode(make_manifest, mode, rule, params):
    from hearthnet.fedlearn.manifest import AggregationSpec

    signed = make_manifest(
        lora_aggregation=mode,
        aggregation=AggregationSpec(rule=rule, params=params),
        min_participants=5,
    )
    entries = _robust_entries(signed)
    agg = FedAvgAggregator(signed.manifest, MODEL_SHAPES)
    for sub, delta in entries:
        agg.add(sub, delta)
    out, verdicts = agg.aggregate_audited()
    attacker = PARTICIPANTS[0].node_id
    assert verdicts[attacker].action == "excluded", verdicts[attacker]
    assert verdicts[attacker].deviation > 3.0
    assert all(v.action != "excluded" for p, v in verdicts.items() if p != attacker) or rule in (
        "krum",
        "multi_krum",
    )
    honest = [delta for sub, delta in entries[1:]]
    if mode == "product_svd" or rule == "geometric_median":  # not coordinate-wise
        # the output is B'·A' of rank r; compare products with the honest ones' range
        for path in {k.rsplit(".", 1)[0] for k in out}:
            prod = out[path + ".lora_B"].double() @ out[path + ".lora_A"].double()
            honest_prods = [
                d[path + ".lora_B"].double() @ _a(signed, d, path).double() for d in honest
            ]
            scale = max(float(p.norm()) for p in honest_prods)
            assert float(prod.norm()) <= 1.5 * scale
    else:
        for key in honest[0]:
            stack = torch.stack([d[key] for d in honest])
            lo, hi = stack.min(0).values, stack.max(0).values
            assert bool((out[key] >= lo - 1e-6).all()) and bool((out[key] <= hi + 1e-6).all()), key


def test_robust_aggregation_does_not_depend_on_submission_order(make_manifest):
    from hearthnet.fedlearn.manifest import AggregationSpec

    for rule, params in [("trimmed_mean", {"beta": 0.2}), ("geometric_median", {"f": 1})]:
        signed = make_manifest(
            aggregation=AggregationSpec(rule=rule, params=params), min_participants=5
        )
        entries = _robust_entries(signed)
        results = []
        for order in (entries, entries[::-1], entries[2:] + entries[:2]):
            agg = FedAvgAggregator(signed.manifest, MODEL_SHAPES)
            for sub, delta in order:
                agg.add(sub, delta)
            out, verdicts = agg.aggregate_audited()
            results.append((_digest(out), verdicts))
        assert results[0] == results[1] == results[2]


def test_a_rule_left_with_too_few_updates_is_refused(make_manifest):
    from hearthnet.fedlearn.manifest import AggregationSpec

    # Krum f = 1 needs 5; the norm filter drops the scaled update and leaves 4
    spec = AggregationSpec(rule="krum", params={"f": 1, "norm_bound": 2.0, "norm_action": "drop"})
    signed = make_manifest(aggregation=spec, min_participants=5)
    agg = FedAvgAggregator(signed.manifest, MODEL_SHAPES)
    for sub, delta in _robust_entries(signed, n=5):
        agg.add(sub, delta)
    with pytest.raises(HearthnetError) as exc:
        agg.aggregate()
    assert exc.value.code is ErrorCode.FEDLEARN_TOLERANCE_EXCEEDED


def _a(signed, delta, path):
    if path + ".lora_A" in delta:
        return delta[path + ".lora_A"]
    m = signed.manifest
    return derive_lora_a(m.seed, path, m.lora_rank, MODEL_SHAPES[path][1])


def _digest(tensors):
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].numpy().tobytes())
    return h.hexdigest()


def test_reputation_weighting_scales_each_claim_by_its_influence(make_manifest):
    from hearthnet.fedlearn.aggregation.aggregator import influenced_weights
    from hearthnet.fedlearn.manifest import AggregationSpec

    signed = make_manifest(
        aggregation=AggregationSpec(rule="fedavg", params={"reputation_weighted": True})
    )
    entries = _robust_entries(signed, scale_attacker=1.0, n=3)
    influence = {PARTICIPANTS[0].node_id: 0.8, PARTICIPANTS[1].node_id: 0.2}  # third: neutral
    agg = FedAvgAggregator(signed.manifest, MODEL_SHAPES, influence)
    for sub, delta in entries:
        agg.add(sub, delta)
    weights = agg.weights()
    order = sorted(weights)
    expected = influenced_weights([10, 10, 10], [influence.get(p, 0.125) for p in order])
    assert [weights[p] for p in order] == expected
    assert weights[PARTICIPANTS[0].node_id] == round(10 * 0.8 * 2**16)
    out = agg.aggregate()
    by_id = {sub.participant: delta for sub, delta in entries}
    for key in [k for k in out if k.endswith("lora_B")]:
        ref = sum(by_id[p][key].double() * weights[p] for p in order) / sum(weights.values())
        assert torch.allclose(out[key].double(), ref, atol=1e-6)
    assert influenced_weights([2**20, 1], [0.8, 0.8]) == [round(2**20 * 0.8), 1]
