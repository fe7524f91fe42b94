import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hearthnet import constants as C
from hearthnet.errors import ErrorCode
from hearthnet.fedlearn.aggregation.aggregator import FedAvgAggregator
from hearthnet.fedlearn.aggregation.secure import (
    SecureFedAvgAggregator,
    deserialize_masked,
    read_masked,
    serialize_masked,
)
from hearthnet.fedlearn.delta import deserialize_delta, serialize_delta
from hearthnet.fedlearn.masks import MaskingKey
from hearthnet.fedlearn.privacy import clip_gradient
from hearthnet.fedlearn.secagg import (
    SecAggRound,
)
from hearthnet.fedlearn.submission import ParticipantSubmission, capped_weights
from tests.helpers import raises_code

from .conftest import MODEL_SHAPES, random_delta
from .secure_helpers import Party, Round, setup_round


def submission(signed, party, payload, samples):
    return ParticipantSubmission.create(party.identity, signed.round_id, payload, samples, 0.1)


def test_secure_aggregation_masks_cancel(make_manifest):
    signed, parties, anns, samples = setup_round(make_manifest, 4)
    rnd = Round(signed, parties, anns, samples)
    zero = {k: torch.zeros_like(v) for k, v in random_delta(signed, 0).items()}
    agg = rnd.aggregator()
    vectors = [rnd.mask(p, zero) for p in parties]
    for p, v, n in zip(parties, vectors, samples, strict=True):
        agg.add(submission(signed, p, b"x", n), v)
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v
    assert np.count_nonzero(total[:-1]) > 0.99 * (total.size - 1)  # self masks stay on
    (unmasked,) = agg.group_totals(rnd.unmasked([p.id for p in parties]))
    assert np.all(unmasked[:-1] == 0)  # Σ pairwise masks == 0; the self masks removed
    assert int(unmasked[-1]) == sum((10, 15, 20, 25))
    assert all(np.count_nonzero(v[:-1]) > 0.99 * (v.size - 1) for v in vectors)


@pytest.mark.parametrize("n", [3, 5])
def test_secure_sum_equals_plain_within_quantisation_bound(make_manifest, n):
    signed, parties, anns, samples = setup_round(make_manifest, n, samples=[7, 30, 12, 9, 100][:n])
    rnd = Round(signed, parties, anns, samples)
    secure = rnd.aggregator()
    plain = FedAvgAggregator(signed.manifest, MODEL_SHAPES)
    clipped_all = []
    for i, party in enumerate(parties):
        delta = random_delta(signed, 50 + i, scale=0.05 * (i + 1))
        clipped = clip_gradient(delta, signed.manifest.clip_norm)
        clipped_all.append(clipped)
        vec = rnd.mask(party, delta)
        payload = serialize_masked(
            vec,
            manifest_sha=signed.manifest_sha,
            round_id=signed.round_id,
            participant=party.identity.node_id,
        )
        received, meta = deserialize_masked(payload, secure.length)
        assert meta["participant"] == party.identity.node_id
        secure.add(submission(signed, party, payload, samples[i]), received)
        plain.add(submission(signed, party, payload, samples[i]), clipped)
    got, want = secure.aggregate(rnd.unmasked([p.id for p in parties])), plain.aggregate()
    assert set(got) == set(want)
    secure_bound = signed.manifest.clip_norm * 2.0 ** -(C.FEDLEARN_SECURE_FRACTION_BITS + 1)
    for key in (k for k in want if k.endswith(".lora_B")):
        # exact reference: the weighted mean of the clipped deltas in float64
        weights = capped_weights(samples)
        ref = sum(w * c[key].double() for w, c in zip(weights, clipped_all, strict=True))
        ref = ref / sum(weights)
        largest = max(float(c[key].abs().max()) for c in clipped_all)
        f32 = float(ref.abs().max()) * 2**-24
        assert (got[key].double() - ref).abs().max().item() <= secure_bound + f32, key
        plain_bound = largest * 2.0**-C.FEDLEARN_AGG_GRID_BITS + f32
        assert (want[key].double() - ref).abs().max().item() <= plain_bound, key
    assert all(torch.equal(got[k], want[k]) for k in want if k.endswith(".lora_A"))


def test_masked_vector_is_uniform_and_independent_of_delta(make_manifest):
    # Enough entries for a valid 256-bin chi-square (~256 expected per bin).
    shapes = {
        "model.layers.0.self_attn.q_proj": (8192, 64),
        "model.layers.0.self_attn.v_proj": (8192, 64),
    }
    signed, parties, anns, samples = setup_round(make_manifest, 3)
    rnd = Round(signed, parties, anns, samples)
    keys = [f"{p}.lora_B" for p in shapes]
    small = {k: torch.zeros(8192, 4) for k in keys}
    large = {k: torch.full((8192, 4), 0.2) for k in keys}
    for delta in (small, large):
        vec = rnd.mask(parties[0], delta, shapes)
        top = (vec >> np.uint64(56)).astype(np.int64)  # the byte a delta would bias most
        low = (vec & np.uint64(0xFF)).astype(np.int64)
        for byte in (top, low):
            counts = np.bincount(byte, minlength=256)
            assert chisquare(counts).pvalue > 1e-4
    # A party that knows the delta but not the masks learns nothing: same vector, new keys.
    zero = {k: torch.zeros_like(v) for k, v in random_delta(signed, 1).items()}
    other = [Party() for _ in range(3)]
    anns2 = {
        p.identity.node_id: p.key.announce(p.identity, signed.round_id, signed.manifest_sha, 10)
        for p in other
    }
    rnd2 = Round(signed, other, anns2, [10] * 3)
    assert not np.array_equal(rnd2.mask(other[0], zero)[:100], rnd.mask(parties[0], zero)[:100])


def test_refusals(make_manifest):
    signed, parties, anns, samples = setup_round(make_manifest, 3)
    rnd = Round(signed, parties, anns, samples)
    two = dict(list(anns.items())[:2])
    with raises_code(ErrorCode.MANIFEST_INVALID):  # fewer than 3: no secure graph
        SecAggRound.build(signed.manifest, signed.manifest_sha, two)
    forged = dict(anns)
    victim = parties[1].identity.node_id
    forged[victim] = anns[victim].model_copy(update={"public_key": MaskingKey().public_key.hex()})
    forged_plan = SecAggRound.build(signed.manifest, signed.manifest_sha, forged)
    with raises_code(ErrorCode.SIGNATURE_INVALID):
        SecureFedAvgAggregator(signed.manifest, MODEL_SHAPES, forged_plan, rnd.shared)
    plain_manifest = make_manifest()
    with raises_code(ErrorCode.MANIFEST_INVALID):
        SecureFedAvgAggregator(plain_manifest.manifest, MODEL_SHAPES, rnd.plan, rnd.shared)

    agg = rnd.aggregator()
    delta = random_delta(signed, 3)
    vecs = [rnd.mask(p, delta) for p in parties]
    with raises_code(ErrorCode.DELTA_INVALID):
        agg.add(submission(signed, parties[0], b"x", samples[0]), vecs[0][:-1])
    with raises_code(ErrorCode.DELTA_INVALID):  # num_samples differs from the announcement
        agg.add(submission(signed, parties[0], b"x", samples[0] + 1), vecs[0])
    stranger = Party()
    with raises_code(ErrorCode.DELTA_INVALID):
        agg.add(submission(signed, stranger, b"x", 10), vecs[0])
    agg.add(submission(signed, parties[0], b"x", samples[0]), vecs[0])
    agg.add(submission(signed, parties[1], b"x", samples[1]), vecs[1])
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED):  # survivors ≠ what was summed
        agg.aggregate(rnd.unmasked([p.id for p in parties]))


def test_lying_about_weight_is_detected(make_manifest):
    signed, parties, anns, samples = setup_round(make_manifest, 3)
    rnd = Round(signed, parties, anns, samples)
    agg = rnd.aggregator()
    delta = random_delta(signed, 4)
    for i, p in enumerate(parties):
        vec = rnd.mask(p, delta)
        if i == 0:
            vec[-1] += np.uint64(1000)  # claims a bigger weight inside the masked vector
        agg.add(submission(signed, p, b"x", samples[i]), vec)
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED) as exc:
        agg.aggregate(rnd.unmasked([p.id for p in parties]))
    assert "weight" in exc.value.message


def test_masked_serialisation_rejects_garbage(make_manifest):
    signed, parties, anns, samples = setup_round(make_manifest, 3)
    vec = Round(signed, parties, anns, samples).mask(parties[0], random_delta(signed, 5))
    data = serialize_masked(
        vec, manifest_sha=signed.manifest_sha, round_id=signed.round_id, participant="p"
    )
    assert (
        serialize_masked(
            vec, manifest_sha=signed.manifest_sha, round_id=signed.round_id, participant="p"
        )
        == data
    )
    with raises_code(ErrorCode.DELTA_INVALID):
        deserialize_masked(data, vec.size + 1)
    with raises_code(ErrorCode.DELTA_INVALID):
        deserialize_masked(b"junk", vec.size)
    assert repr(parties[0].key) == "MaskingKey(<secret>)"


def test_stored_masked_vector_streams_back_bit_for_bit(make_manifest, tmp_path):
    """Aggregation reads a vector checked at submission without parsing it again."""
    signed, parties, anns, samples = setup_round(make_manifest, 3)
    vec = Round(signed, parties, anns, samples).mask(parties[0], random_delta(signed, 5))
    data = serialize_masked(
        vec, manifest_sha=signed.manifest_sha, round_id=signed.round_id, participant="p"
    )
    path = tmp_path / "masked"
    path.write_bytes(data)
    streamed = read_masked(path, vec.size)
    parsed, _ = deserialize_masked(data, vec.size)
    assert streamed.dtype == parsed.dtype == np.uint64
    assert streamed.tobytes() == parsed.tobytes() == vec.tobytes()
    with raises_code(ErrorCode.DELTA_INVALID):
        read_masked(path, vec.size + 1)
    path.write_bytes(data[:-8])
    with raises_code(ErrorCode.DELTA_INVALID):
        read_masked(path, vec.size)


def test_masking_the_trained_tensors_equals_masking_the_stored_delta(make_manifest):
    """A participant masks the tensors it stored instead of reading its blob back: same
    bytes, also when the delta has to be clipped."""
    signed, parties, anns, samples = setup_round(make_manifest, 3)
    rnd = Round(signed, parties, anns, samples)
    delta = {k: v * 50 for k, v in random_delta(signed, 6).items()}  # beyond clip_norm
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(delta.items())}
    data = serialize_delta(tensors, manifest_sha=signed.manifest_sha, round_id="r", participant="p")
    parsed, _ = deserialize_delta(data)
    from_blob = rnd.mask(parties[0], dict(sorted(parsed.items())))
    from_memory = rnd.mask(parties[0], tensors)
    assert from_memory.tobytes() == from_blob.tobytes()


def test_masked_inputs_beyond_the_clip_bound_are_refused(make_manifest):
    """Issue 13 item 7: one masked input cannot be range-checked, but the unmasked total can.
    Every honest party at the very edge of the clip bound (one entry quantised to -_STEPS) sums
    to exactly -_STEPS × Σ weights and aggregates; one unit more from one party is refused."""
    signed, parties, anns, samples = setup_round(make_manifest, 3)
    rnd = Round(signed, parties, anns, samples)
    first = min(random_delta(signed, 0))
    edge = {k: torch.zeros_like(v) for k, v in random_delta(signed, 0).items()}
    edge[first].view(-1)[0] = -5.0  # clipped to -clip_norm: quantised to exactly -_STEPS

    def run(cheat: int | None):
        agg = rnd.aggregator()
        for i, p in enumerate(parties):
            vec = rnd.mask(p, edge)
            if i == cheat:
                vec[0] -= np.uint64(1)  # one quantisation step beyond its -_STEPS × weight
            agg.add(submission(signed, p, b"x", samples[i]), vec)
        return agg.aggregate(rnd.unmasked([p.id for p in parties]))

    out = run(None)
    assert out[first].view(-1)[0].item() == pytest.approx(-1.0)  # the mean of three edges
    with raises_code(ErrorCode.FEDLEARN_AGGREGATION_FAILED) as exc:
        run(0)
    assert "out of range" in exc.value.message and "clip bound" in exc.value.message
