import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.delta import deserialize_delta, serialize_delta, validate_delta
from hearthnet.fedlearn.lora import expected_shapes
from hearthnet.fedlearn.submission import ParticipantSubmission
from hearthnet.identity import NodeIdentity
from tests.helpers import raises_code

from .conftest import MODEL_SHAPES, random_delta


def _ser(delta, signed, participant="hnx"):
    return serialize_delta(
        delta, manifest_sha=signed.manifest_sha, round_id=signed.round_id, participant=participant
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_delta_serialisation_roundtrip(make_manifest, dtype):
    signed = make_manifest(lora_aggregation="fedavg_ab")
    delta = random_delta(signed, 1, dtype=dtype)
    tensors, meta = deserialize_delta(_ser(delta, signed))
    assert set(tensors) == set(delta)
    for key, t in delta.items():
        assert tensors[key].dtype == dtype and tensors[key].shape == t.shape
        assert torch.equal(tensors[key], t)
    assert meta["round_id"] == signed.round_id and meta["manifest_sha"] == signed.manifest_sha
    assert meta["participant"] == "hnx"


def test_serialisation_is_byte_stable(make_manifest):
    """Same tensors and metadata, same bytes: the SHA is a function of the content."""
    signed = make_manifest()
    delta = random_delta(signed, 9)
    first = _ser(delta, signed)
    assert all(_ser(dict(delta), signed) == first for _ in range(20))
    assert deserialize_delta(first)[1]["round_id"] == signed.round_id


def test_expected_keys_by_mode(make_manifest):
    frozen = expected_shapes(make_manifest().manifest, MODEL_SHAPES)
    assert all(k.endswith(".lora_B") for k in frozen) and len(frozen) == 4  # 2 layers x q,v
    assert frozen["model.layers.0.self_attn.v_proj.lora_B"] == (8, 4)
    both = expected_shapes(make_manifest(lora_aggregation="product_svd").manifest, MODEL_SHAPES)
    assert both["model.layers.1.self_attn.q_proj.lora_A"] == (4, 32) and len(both) == 8


def test_valid_delta_passes(make_manifest):
    signed = make_manifest()
    validate_delta(random_delta(signed, 2), signed.manifest, MODEL_SHAPES)


def _mutated(signed, how):
    delta = random_delta(signed, 3)
    key = "model.layers.1.self_attn.q_proj.lora_B"
    if how == "nan":
        delta[key][0, 0] = float("nan")
    elif how == "inf":
        delta[key][3, 1] = float("-inf")
    elif how == "missing":
        del delta[key]
    elif how == "extra":
        delta["model.layers.1.self_attn.q_proj.lora_A"] = torch.zeros(4, 32)
    elif how == "shape":
        delta[key] = torch.zeros(32, 5)
    elif how == "dtype":
        delta[key] = torch.zeros(32, 4, dtype=torch.float64)
    elif how == "int":
        delta[key] = torch.zeros(32, 4, dtype=torch.int32)
    return delta, key


@pytest.mark.parametrize("how", ["nan", "inf", "missing", "extra", "shape", "dtype", "int"])
def test_invalid_deltas_name_the_key(make_manifest, how):
    signed = make_manifest()
    delta, key = _mutated(signed, how)
    with pytest.raises(HearthnetError) as exc:
        validate_delta(delta, signed.manifest, MODEL_SHAPES)
    assert exc.value.code is ErrorCode.DELTA_INVALID
    expected_key = "model.layers.1.self_attn.q_proj.lora_A" if how == "extra" else key
    assert exc.value.detail == {"key": expected_key}


def test_size_limit(make_manifest):
    signed = make_manifest()
    data = _ser(random_delta(signed, 4), signed)
    with raises_code(ErrorCode.DELTA_INVALID):
        validate_delta(
            random_delta(signed, 4),
            signed.manifest,
            MODEL_SHAPES,
            size=len(data),
            max_bytes=len(data) - 1,
        )
    with raises_code(ErrorCode.DELTA_INVALID):
        deserialize_delta(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage!",
        pickle.dumps({"x": 1}),
        struct.pack("<Q", 2**40) + b"{}",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 7) + b'{"a":1}',
        st_save({"x": torch.zeros(2)}),  # valid safetensors but no hearthnet metadata
        st_save({"x": torch.zeros(2, dtype=torch.int64)}, {"format": "hearthnet.fedlearn.delta/1"}),
    ],
)
def test_garbage_bytes_are_delta_invalid(data):
    with pytest.raises(HearthnetError) as exc:
        deserialize_delta(data)
    assert exc.value.code is ErrorCode.DELTA_INVALID


def test_truncated_tensor_data_is_delta_invalid(make_manifest):
    signed = make_manifest()
    data = _ser(random_delta(signed, 5), signed)
    with pytest.raises(HearthnetError) as exc:
        deserialize_delta(data[:-10])
    assert exc.value.code is ErrorCode.DELTA_INVALID


def test_submission_signature(make_manifest):
    signed = make_manifest()
    participant = NodeIdentity.generate()
    data = _ser(random_delta(signed, 6), signed, participant.node_id)
    sub = ParticipantSubmission.create(participant, signed.round_id, data, 42, 1.5)
    sub.verify(data)
    assert sub.participant == participant.node_id and sub.num_samples == 42
    wire = ParticipantSubmission.model_validate(sub.model_dump())
    wire.verify(data)
    for field, value in [
        ("num_samples", 43),
        ("delta_sha", "0" * 64),
        ("participant", NodeIdentity.generate().node_id),
    ]:
        forged = sub.model_copy(update={field: value})
        with pytest.raises(HearthnetError) as exc:
            forged.verify()
        assert exc.value.code is ErrorCode.SIGNATURE_INVALID
    with pytest.raises(HearthnetError) as exc:
        sub.verify(data + b"x")
    assert exc.value.code is ErrorCode.DELTA_INVALID
    with pytest.raises(ValueError):
        ParticipantSubmission.create(participant, signed.round_id, data, 1, float("nan"))


def test_submission_signs_the_steps_run(make_manifest):
    from hearthnet import constants as C
    from hearthnet.canonical import canonical_bytes, sha256_hex

    signed = make_manifest()
    participant = NodeIdentity.generate()
    data = _ser(random_delta(signed, 7), signed, participant.node_id)
    sub = ParticipantSubmission.create(participant, signed.round_id, data, 42, 1.5, steps=18)
    wire = ParticipantSubmission.model_validate(sub.model_dump())
    wire.verify(data)
    assert wire.steps == 18
    for steps in (30, None):  # claiming more steps, or hiding how many ran, breaks it
        with pytest.raises(HearthnetError) as exc:
            sub.model_copy(update={"steps": steps}).verify(data)
        assert exc.value.code is ErrorCode.SIGNATURE_INVALID
    # a submission signed before steps were reported (no `steps` in the signed bytes) verifies
    old_bytes = canonical_bytes(
        {
            "purpose": C.FEDLEARN_SUBMISSION_PURPOSE,
            "round_id": signed.round_id,
            "participant": participant.node_id,
            "delta_sha": sha256_hex(data),
            "num_samples": 42,
        }
    )
    old = sub.model_dump()
    del old["steps"]
    old["signature"] = participant.sign(old_bytes).hex()
    legacy = ParticipantSubmission.model_validate(old)
    legacy.verify(data)
    assert legacy.steps is None
    with pytest.raises(HearthnetError) as exc:  # ... but not with a steps claim added later
        legacy.model_copy(update={"steps": 30}).verify(data)
    assert exc.value.code is ErrorCode.SIGNATURE_INVALID
    with pytest.raises(ValueError):
        ParticipantSubmission.model_validate(sub.model_dump() | {"steps": 0})


def test_lazy_delta_reads_tensors_on_demand(make_manifest, tmp_path):
    from hearthnet.fedlearn.delta import LazyDelta

    signed = make_manifest()
    delta = random_delta(signed, 11)
    path = tmp_path / "d.safetensors"
    path.write_bytes(_ser(delta, signed))
    lazy = LazyDelta(path)
    assert sorted(lazy) == sorted(delta) and len(lazy) == len(delta)
    assert lazy.metadata["round_id"] == signed.round_id
    assert all(torch.equal(lazy[k], delta[k]) for k in delta)
    validate_delta(lazy, signed.manifest, MODEL_SHAPES)
    with pytest.raises(KeyError):
        lazy["nope"]
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xff" * 16)
    with raises_code(ErrorCode.DELTA_INVALID):
        LazyDelta(bad)
    with raises_code(ErrorCode.DELTA_INVALID):
        LazyDelta(path, max_bytes=10)


@pytest.mark.parametrize("how", ["offsets_past_end", "wrong_size", "negative", "truncated"])
def test_lazy_delta_checks_every_span(make_manifest, tmp_path, how):
    import json

    from hearthnet.canonical import canonical_bytes
    from hearthnet.fedlearn.delta import LazyDelta

    signed = make_manifest()
    data = _ser(random_delta(signed, 12), signed)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = sorted(k for k in header if k != "__metadata__")[0]
    begin, end = header[key]["data_offsets"]
    body = data[8 + n :]
    if how == "offsets_past_end":
        header[key]["data_offsets"] = [begin, len(body) + 4]
    elif how == "wrong_size":
        header[key]["data_offsets"] = [begin, end - 4]
    elif how == "negative":
        header[key]["data_offsets"] = [-4, end]
    else:
        body = body[:-4]
    text = canonical_bytes(header)
    text += b" " * (-len(text) % 8)
    path = tmp_path / "d"
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    with pytest.raises(HearthnetError) as exc:
        LazyDelta(path)
    assert exc.value.code is ErrorCode.DELTA_INVALID
