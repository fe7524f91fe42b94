"""SecAgg+ (fedlearn/secagg.py, secagg_graph.py, shares.py): drop-outs after the key exchange,
the neighbour graph, Shamir recovery and what a member refuses to reveal."""

import math

import numpy as np
import pytest
import torch

from hearthnet import constants as C
from hearthnet.errors import ErrorCode
from hearthnet.fedlearn import secagg_graph, shares
from hearthnet.fedlearn.privacy import clip_gradient
from hearthnet.fedlearn.secagg import check_reveal, check_unmask, recover_all, unmask_request
from hearthnet.fedlearn.submission import capped_weights
from tests.helpers import raises_code

from .conftest import random_delta
from .secure_helpers import Round, setup_round
from .test_secure import submission


def test_degree_grows_with_log_n_and_holds_the_declared_fractions():
    small = secagg_graph.derive(6, 0.3, 0.1)
    assert (small.degree, small.threshold, small.complete) == (5, 3, True)
    assert small.tolerated_dropouts == 2
    degrees = [secagg_graph.derive(n, 0.1, 0.05).degree for n in (10**3, 10**4, 10**5)]
    assert degrees == sorted(degrees) and degrees[-1] < 120  # sparse, and ~log n
    assert degrees[-1] - degrees[0] <= 4 * math.log2(100)
    for n in (10, 32, 1000):
        p = secagg_graph.derive(n, 0.3, 0.1)
        assert p.threshold > p.degree // 2  # a majority, and then some:
        if p.complete:  # the exact counts hold, and 2t − k exceeds the corrupt ones
            assert math.floor(0.3 * n) <= p.degree - p.threshold
            assert 2 * p.threshold - p.degree > math.floor(0.1 * n)
    with raises_code(ErrorCode.MANIFEST_INVALID) as exc:
        secagg_graph.derive(5, 0.45, 0.1)
    assert "secagg_dropout" in exc.value.message


def test_sparse_graph_is_symmetric_and_regular():
    names = [f"n{i:04d}" for i in range(400)]
    params = secagg_graph.derive(400, 0.1, 0.05)
    assert not params.complete
    near = secagg_graph.neighbours(b"s" * 32, [names], {400: params})
    assert all(len(v) == params.degree for v in near.values())
    assert all(a in near[b] for a, vs in near.items() for b in vs)
    other = secagg_graph.neighbours(b"t" * 32, [names], {400: params})
    assert other != near  # the seed places nodes on the ring


def test_shamir_shares_recover_only_from_the_threshold_and_outvote_a_bad_share():
    secret = bytes(range(32))
    parts = shares.split(secret, 3, 5)
    assert all(len(p) == shares.SHARE_BYTES for p in parts)
    assert shares.combine(parts[1:4]) == secret
    assert shares.combine(parts[:2] + parts[2:3]) == secret
    assert shares.combine(parts[:2]) != secret  # two of three: another secret entirely
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED):
        shares.recover(parts[:2], 3, lambda s: s == secret)
    bad = bytearray(parts[0])
    bad[5] ^= 1
    assert shares.recover([bytes(bad), *parts[1:]], 3, lambda s: s == secret) == secret


def _plain_mean(signed, deltas, samples, names):
    weights = dict(
        zip(sorted(names), capped_weights([samples[n] for n in sorted(names)]), strict=True)
    )
    clipped = {n: clip_gradient(deltas[n], signed.manifest.clip_norm) for n in names}
    total = sum(weights.values())
    return {
        k: sum(weights[n] * clipped[n][k].double() for n in names) / total
        for k in clipped[names[0]]
    }


@pytest.mark.parametrize("lost_before_shares", [0, 1])
def test_survivors_sum_is_recovered_after_two_of_six_drop(make_manifest, lost_before_shares):
    """Two of six drop after the key exchange (both after sending shares, or one before): the
    round gives the survivors' weighted mean within the quantisation bound, and the weights are
    the roster's capped weights of the survivors."""
    signed, parties, anns, samples = setup_round(
        make_manifest, 6, samples=[7, 30, 12, 9, 100, 20], max_participants=6
    )
    lost = {parties[4].id} if lost_before_shares else set()
    rnd = Round(signed, parties, anns, samples, lost_before_shares=lost)
    dropped = {parties[4].id, parties[5].id}
    survivors = [p for p in parties if p.id not in dropped]
    deltas = {
        p.id: random_delta(signed, 70 + i, scale=0.05 * (i + 1)) for i, p in enumerate(parties)
    }
    agg = rnd.aggregator()
    by_name = {p.id: n for p, n in zip(parties, samples, strict=True)}
    for p in survivors:
        agg.add(submission(signed, p, b"x", by_name[p.id]), rnd.mask(p, deltas[p.id]))
    unmasked = rnd.unmasked([p.id for p in survivors])
    assert set(unmasked.mask_keys) == dropped - lost  # only keys of members that shared
    assert set(unmasked.self_seeds) == {p.id for p in survivors}
    got = agg.aggregate(unmasked)
    roster_w = dict(
        zip(sorted(anns), capped_weights([anns[p].num_samples for p in sorted(anns)]), strict=True)
    )
    names = [p.id for p in survivors]
    total_w = sum(roster_w[n] for n in names)
    clipped = {n: clip_gradient(deltas[n], 1.0) for n in names}
    bound = 2.0 ** -(C.FEDLEARN_SECURE_FRACTION_BITS + 1)
    for key in (k for k in got if k.endswith(".lora_B")):
        ref = sum(roster_w[n] * clipped[n][key].double() for n in names) / total_w
        assert (got[key].double() - ref).abs().max().item() <= bound + float(
            ref.abs().max()
        ) * 2**-24


def test_a_dropped_members_update_stays_hidden_and_no_member_reveals_both(make_manifest):
    signed, parties, anns, samples = setup_round(make_manifest, 6, max_participants=6)
    rnd = Round(signed, parties, anns, samples)
    ids = [p.id for p in parties]
    req = unmask_request(rnd.plan, rnd.shared, ids[:4])
    reveals = rnd.reveals(req)
    for rev in reveals.values():
        assert not set(rev.self_shares) & set(rev.key_shares)
        assert set(rev.key_shares) <= {ids[4], ids[5]}
    check_reveal(rnd.plan, req, ids[0], reveals[ids[0]], rnd.bundles)
    # a reveal that hands over a survivor's mask-key share is refused
    forged = reveals[ids[0]].model_copy(
        update={"key_shares": {ids[1]: next(iter(reveals[ids[0]].self_shares.values()))}}
    )
    with raises_code(ErrorCode.DELTA_INVALID):
        check_reveal(rnd.plan, req, ids[0], forged, rnd.bundles)
    with raises_code(ErrorCode.FORBIDDEN):
        check_reveal(rnd.plan, req, ids[1], reveals[ids[0]], rnd.bundles)


def test_a_member_refuses_an_unmask_that_does_not_split_the_share_set(make_manifest):
    signed, parties, anns, samples = setup_round(make_manifest, 6, max_participants=6)
    rnd = Round(signed, parties, anns, samples)
    ids = sorted(p.id for p in parties)
    good = unmask_request(rnd.plan, rnd.shared, ids[:4])
    check_unmask(rnd.plan, rnd.shared, good)
    both = good.model_copy(update={"dropped": [*good.dropped, ids[0]]})
    with raises_code(ErrorCode.SIGNATURE_INVALID):
        check_unmask(rnd.plan, rnd.shared, both)  # one member listed survived and dropped
    with raises_code(ErrorCode.FEDLEARN_MIN_PARTICIPANTS_UNMET):
        check_unmask(rnd.plan, rnd.shared, unmask_request(rnd.plan, rnd.shared, ids[:2]))


def test_the_coordinator_gets_neither_secret_below_the_threshold(make_manifest):
    """With fewer than t reveals a secret stays unrecoverable, and the recovered key of a
    dropped member is checked against its announced public key."""
    signed, parties, anns, samples = setup_round(make_manifest, 6, max_participants=6)
    rnd = Round(signed, parties, anns, samples)
    ids = [p.id for p in parties]
    req = unmask_request(rnd.plan, rnd.shared, ids[:4])
    reveals = rnd.reveals(req)
    t = rnd.plan.threshold(ids[0])
    few = dict(list(reveals.items())[: t - 1])
    from hearthnet.fedlearn.secagg import ready, recover_all

    assert not ready(rnd.plan, req, few)
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED):
        recover_all(rnd.plan, req, few)
    assert ready(rnd.plan, req, reveals)


def test_buckets_come_from_the_public_seed_and_cover_the_roster():
    roster = [f"n{i:02d}" for i in range(10)]
    one = secagg_graph.buckets(b"a" * 32, roster, 3)
    assert sorted(len(b) for b in one) == [3, 3, 4]
    assert sorted(p for b in one for p in b) == roster
    assert secagg_graph.buckets(b"a" * 32, roster, 3) == one
    assert secagg_graph.buckets(b"b" * 32, roster, 3) != one


def _bucket_round(make_manifest, rule, params, size, lost=()):
    from hearthnet.fedlearn.terms import AggregationSpec

    signed, parties, anns, samples = setup_round(
        make_manifest,
        10,
        samples=[10] * 10,
        min_participants=10,
        max_participants=10,
        secure_bucket_size=size,
        aggregation=AggregationSpec(rule=rule, params=params),
    )
    rnd = Round(signed, parties, anns, samples)
    honest = random_delta(signed, 5, scale=0.02)
    poison = {k: -v * 40 for k, v in honest.items()}  # clipped to norm 1, pointing away
    bad = {sorted(p.id for p in parties)[0]}
    agg = rnd.aggregator()
    for p in parties:
        if p.id in lost:
            continue
        delta = poison if p.id in bad else honest
        agg.add(submission(signed, p, b"x", 10), rnd.mask(p, delta))
    survivors = [p.id for p in parties if p.id not in lost]
    req = unmask_request(rnd.plan, rnd.shared, survivors)
    return rnd, agg, req, honest


def test_secure_median_over_bucket_means_resists_a_poisoned_member(make_manifest):
    rnd, agg, req, honest = _bucket_round(make_manifest, "median", {"f": 2}, 2)
    assert len(rnd.plan.groups) == 5 and all(len(g) == 2 for g in rnd.plan.groups)
    out = agg.aggregate(rnd.recover(req))
    key = next(k for k in out if k.endswith(".lora_B"))
    # the honest delta's own value, clipped (it is within norm 1), up to quantisation
    ref = clip_gradient(honest, 1.0)[key].double()
    assert (out[key].double() - ref).abs().max().item() <= 1e-6
    mean = (9 * ref + clip_gradient({key: -honest[key] * 40}, 1.0)[key].double()) / 10
    assert (mean - ref).abs().max().item() > 10 * (out[key].double() - ref).abs().max().item()


def test_secure_trimmed_mean_over_bucket_means_trims_the_poisoned_bucket(make_manifest):
    rnd, agg, req, honest = _bucket_round(make_manifest, "trimmed_mean", {"beta": 0.2}, 2)
    out = agg.aggregate(rnd.recover(req))  # five buckets: one trimmed per tail
    key = next(k for k in out if k.endswith(".lora_B"))
    ref = clip_gradient(honest, 1.0)[key].double()
    assert (out[key].double() - ref).abs().max().item() <= 1e-6


def test_a_bucket_that_lost_a_member_is_left_out_not_revealed(make_manifest):
    """A bucket of two with one member dropped: its lone survivor's vector is left out (listed
    as dropped) and nobody reveals its self-mask share; the other buckets still aggregate."""
    signed, parties, anns, samples = setup_round(
        make_manifest,
        6,
        samples=[10] * 6,
        min_participants=4,
        max_participants=6,
        secure_bucket_size=2,
    )
    rnd = Round(signed, parties, anns, samples)
    victim = rnd.plan.groups[0][0]
    partner = rnd.plan.groups[0][1]
    req = unmask_request(rnd.plan, rnd.shared, [p.id for p in parties if p.id != victim])
    assert partner in req.dropped and victim in req.dropped
    reveals = rnd.reveals(req)
    assert partner not in reveals  # listed dropped: it is not asked
    assert all(
        partner not in r.self_shares and victim not in r.key_shares for r in reveals.values()
    )
    agg = rnd.aggregator()
    deltas = {p.id: random_delta(signed, 90 + i, scale=0.03) for i, p in enumerate(parties)}
    for p in parties:
        if p.id in req.survivors:
            agg.add(submission(signed, p, b"x", 10), rnd.mask(p, deltas[p.id]))
    out = agg.aggregate(recover_all(rnd.plan, req, reveals))
    key = next(k for k in out if k.endswith(".lora_B"))
    ref = sum(clip_gradient(deltas[p], 1.0)[key].double() for p in req.survivors) / 4
    assert (out[key].double() - ref).abs().max().item() <= 1e-6


def test_a_bucket_out_of_range_is_left_out_and_a_non_finite_delta_is_never_masked(make_manifest):
    """One member writes values beyond the clip bound straight into its masked vector: its
    bucket's total fails the range check and is left out; the median runs over the other four
    buckets. A NaN delta is refused before masking (it would quantise to the lowest int64)."""
    from hearthnet.fedlearn.terms import AggregationSpec

    signed, parties, anns, samples = setup_round(
        make_manifest,
        10,
        samples=[10] * 10,
        min_participants=10,
        max_participants=10,
        secure_bucket_size=2,
        aggregation=AggregationSpec(rule="median", params={"f": 1}),
    )
    rnd = Round(signed, parties, anns, samples)
    honest = random_delta(signed, 5, scale=0.02)
    agg = rnd.aggregator()
    cheat = sorted(p.id for p in parties)[3]
    for p in parties:
        vec = rnd.mask(p, honest)
        if p.id == cheat:
            vec[:-1] += np.uint64(2**40)  # far beyond ±2^32 per entry
        agg.add(submission(signed, p, b"x", 10), vec)
    out = agg.aggregate(rnd.unmasked([p.id for p in parties]))
    assert len(agg.refused_groups) == 1
    key = next(k for k in out if k.endswith(".lora_B"))
    assert (out[key].double() - clip_gradient(honest, 1.0)[key].double()).abs().max() <= 1e-6
    nan = {k: torch.full_like(v, float("nan")) for k, v in honest.items()}
    with raises_code(ErrorCode.DELTA_INVALID, "not finite"):
        rnd.mask(parties[0], nan)


def test_equivocating_unmask_requests_cannot_all_be_confirmed(make_manifest):
    """The hostile review's attack: different requests to different members, each containing
    the victim as a survivor. A member reveals only with every listed survivor's signature on
    its exact request, and each member signs one request, so at most one of them is ever
    revealed for; a member listed as dropped, or told that more of its neighbours dropped than
    may, signs nothing."""
    from hearthnet.fedlearn.secagg import check_confirmations, check_own_view, confirm_bytes

    signed, parties, anns, samples = setup_round(make_manifest, 6, max_participants=6)
    rnd = Round(signed, parties, anns, samples)
    ids = sorted(p.id for p in parties)
    by_id = {p.id: p for p in parties}
    victim = ids[0]
    r1 = unmask_request(rnd.plan, rnd.shared, ids[:4])
    r2 = r1.model_copy(update={"survivors": [victim, *ids[3:]], "dropped": ids[1:3]})
    assert r1.sha != r2.sha and victim in r1.survivors and victim in r2.survivors
    signs = {m: by_id[m].identity.sign(confirm_bytes(r1.round_id, r1.sha)).hex() for m in ids}
    check_confirmations(r1, {m: signs[m] for m in r1.survivors})
    for_r2 = {m: signs[m] for m in r2.survivors if m != victim}  # the victim signed r1 only
    for_r2[victim] = signs[victim]
    with raises_code(ErrorCode.SIGNATURE_INVALID, "lacks a valid confirmation"):
        check_confirmations(r2, for_r2)
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED, "listed as dropped"):
        check_own_view(ids[5], rnd.plan, r1)
    many = r1.model_copy(update={"survivors": ids[:3], "dropped": ids[3:]})
    with raises_code(ErrorCode.SIGNATURE_INVALID, "more of this node's neighbours"):
        check_own_view(ids[0], rnd.plan, many)  # 3 of its 5 neighbours dropped; 2 may


def test_a_revealed_share_must_be_the_one_its_owner_committed_to(make_manifest):
    """A bad revealer sends a wrong value at the right x: refused against the owner's signed
    commitment, so recovery uses the honest reveals only and still succeeds."""
    signed, parties, anns, samples = setup_round(make_manifest, 6, max_participants=6)
    rnd = Round(signed, parties, anns, samples)
    ids = sorted(p.id for p in parties)
    req = unmask_request(rnd.plan, rnd.shared, ids)
    reveals = rnd.reveals(req)
    liar = ids[0]
    owner, hexed = next(iter(reveals[liar].self_shares.items()))
    bad = hexed[:4] + ("0" if hexed[4] != "0" else "1") + hexed[5:]
    forged = reveals[liar].model_copy(
        update={"self_shares": {**reveals[liar].self_shares, owner: bad}}
    )
    with raises_code(ErrorCode.DELTA_INVALID, "committed to"):
        check_reveal(rnd.plan, req, liar, forged, rnd.bundles)
    honest = {p: r for p, r in reveals.items() if p != liar}
    unmasked = recover_all(rnd.plan, req, honest)
    assert set(unmasked.self_seeds) == set(ids)


def test_a_sum_longer_than_the_clip_allows_is_refused(make_manifest):
    """Every entry at 0.9 of the per-entry limit passes an entry-wise range check, but its L2
    norm is far beyond clip_norm: the unmasked sum's norm is checked too."""
    signed, parties, anns, samples = setup_round(make_manifest, 3)
    rnd = Round(signed, parties, anns, samples)
    agg = rnd.aggregator()
    zero = {k: torch.zeros_like(v) for k, v in random_delta(signed, 0).items()}
    steps = np.uint64(int(0.9 * 2**C.FEDLEARN_SECURE_FRACTION_BITS) * samples[0])
    for i, p in enumerate(parties):
        vec = rnd.mask(p, zero)
        if i == 0:
            vec[:-1] += steps
        agg.add(submission(signed, p, b"x", samples[i]), vec)
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED, "longer than the clip bound"):
        agg.aggregate(rnd.unmasked([p.id for p in parties]))


def test_a_bucket_caught_out_of_range_no_longer_counts_against_f(make_manifest):
    """Median with f = 2 over five buckets: two attackers caught by the range check leave three
    buckets, which a median holding the remaining f = 0 accepts (plain: refused at f = 2)."""
    from hearthnet.fedlearn.terms import AggregationSpec

    signed, parties, anns, samples = setup_round(
        make_manifest,
        10,
        samples=[10] * 10,
        min_participants=10,
        max_participants=10,
        secure_bucket_size=2,
        aggregation=AggregationSpec(rule="median", params={"f": 2}),
    )
    rnd = Round(signed, parties, anns, samples)
    honest = random_delta(signed, 5, scale=0.02)
    cheats = {g[0] for g in rnd.plan.groups[:2]}  # in two different buckets
    agg = rnd.aggregator()
    for p in parties:
        vec = rnd.mask(p, honest)
        if p.id in cheats:
            vec[:-1] += np.uint64(2**63)  # what a NaN would quantise to
        agg.add(submission(signed, p, b"x", 10), vec)
    out = agg.aggregate(rnd.unmasked([p.id for p in parties]))
    assert len(agg.refused_groups) == 2
    key = next(k for k in out if k.endswith(".lora_B"))
    assert (out[key].double() - clip_gradient(honest, 1.0)[key].double()).abs().max() <= 1e-6
