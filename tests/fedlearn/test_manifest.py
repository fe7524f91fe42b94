from datetime import UTC, datetime, timedelta

import pytest
from ulid import ULID

from hearthnet.canonical import canonical_bytes, parse_json, sha256_hex
from hearthnet.config import FedLearnConfig
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.manifest import (
    AggregationSpec,
    RoundManifest,
    RoundManifestDraft,
    SignedManifest,
)
from hearthnet.identity import NodeIdentity
from tests.helpers import raises_code

from .conftest import DRAFT


def test_manifest_canonicalisation_stable(make_manifest):
    signed = make_manifest()
    reencoded = canonical_bytes(parse_json(signed.body))
    assert reencoded == signed.body
    assert sha256_hex(reencoded) == signed.manifest_sha
    again = canonical_bytes(RoundManifest.model_validate(parse_json(signed.body)).to_json())
    assert again == signed.body


def test_manifest_signature_roundtrip(make_manifest, coordinator):
    signed = make_manifest()
    received = SignedManifest.from_wire(signed.to_wire(), roster=[coordinator.node_id])
    assert received.manifest == signed.manifest
    assert received.manifest_sha == signed.manifest_sha
    assert received.coordinator_sig == signed.signature
    assert ULID.from_str(received.round_id)
    assert received.manifest.coordinator == coordinator.node_id


def test_signature_covers_everything_but_itself(make_manifest, coordinator):
    signed = make_manifest()
    wire = signed.to_wire()
    assert "signature" not in parse_json(wire["body"])
    for field, value in [("lora_rank", 8), ("seed", 1), ("topic", "other"), ("secure", True)]:
        body = parse_json(wire["body"])
        body[field] = value
        forged = {"body": canonical_bytes(body).decode(), "signature": wire["signature"]}
        with pytest.raises(HearthnetError) as exc:
            SignedManifest.from_wire(forged, roster=[coordinator.node_id])
        assert exc.value.code is ErrorCode.SIGNATURE_INVALID


def test_untrusted_signer_is_signature_invalid(make_manifest, coordinator):
    signed = make_manifest()
    with pytest.raises(HearthnetError) as exc:
        SignedManifest.from_wire(signed.to_wire(), roster=[NodeIdentity.generate().node_id])
    assert exc.value.code is ErrorCode.SIGNATURE_INVALID
    assert exc.value.message == "manifest rejected"  # says nothing about whose signature
    # A member re-signing someone else's manifest body is still rejected: coordinator != signer.
    member = NodeIdentity.generate()
    resigned = {"body": signed.to_wire()["body"], "signature": member.sign(signed.body).hex()}
    with raises_code(ErrorCode.SIGNATURE_INVALID):
        SignedManifest.from_wire(resigned, roster=[member.node_id, coordinator.node_id])


@pytest.mark.parametrize(
    "wire",
    [
        None,
        {},
        {"body": "{}", "signature": "00"},
        {"body": 3, "signature": "x"},
        {"body": '{"a":1, "a":2}', "signature": "00" * 64},
        {"body": '{"b":1,"a":2}', "signature": "00" * 64},
    ],
)
def test_garbage_on_the_wire_is_signature_invalid(wire, coordinator):
    with pytest.raises(HearthnetError) as exc:
        SignedManifest.from_wire(wire, roster=[coordinator.node_id])
    assert exc.value.code is ErrorCode.SIGNATURE_INVALID


def test_defaults_come_from_config(make_manifest):
    m = make_manifest(FedLearnConfig(dp_noise_scale_default=0.5, clip_norm_default=2.0)).manifest
    assert (m.dp_noise_scale, m.clip_norm) == (0.5, 2.0)
    assert m.lora_aggregation == "frozen_a"
    assert m.aggregation.rule == "fedavg" and m.secure is False and m.min_reputation is None


@pytest.mark.parametrize(
    ("overrides", "config", "fragment"),
    [
        ({"lora_rank": 32}, FedLearnConfig(max_lora_rank=16), "max_lora_rank"),
        (
            {"lora_target_modules": ("q_proj", "v_proj", "k_proj")},
            FedLearnConfig(max_lora_target_modules=2),
            "lora_target_modules",
        ),
        ({"train_steps": 500}, FedLearnConfig(max_train_steps=100), "max_train_steps"),
        (
            {"max_participants": 20},
            FedLearnConfig(max_round_participants=10),
            "max_round_participants",
        ),
        ({"min_participants": 2}, FedLearnConfig(), "min_round_participants"),
        ({"min_participants": 5, "max_participants": 4}, FedLearnConfig(), "exceeds"),
        ({"dp_noise_scale": 0.1, "clip_norm": 0.0}, FedLearnConfig(), "clip_norm"),
        ({"deadline": datetime.now(UTC) - timedelta(seconds=1)}, FedLearnConfig(), "deadline"),
        ({"deadline": datetime.now(UTC) + timedelta(days=30)}, FedLearnConfig(), "too far"),
        (
            {"secure": True, "min_participants": 2},
            FedLearnConfig(min_round_participants=1),
            "(--min-participants) >= 3",
        ),
        ({"secure": True, "lora_aggregation": "product_svd"}, FedLearnConfig(), "product"),
        ({"secure": True, "clip_norm": 0.0}, FedLearnConfig(), "clip_norm"),
        (
            {"secure": True, "aggregation": AggregationSpec(rule="median")},
            FedLearnConfig(),
            "set secure_bucket_size",
        ),
        (
            {
                "aggregation": AggregationSpec(rule="median", params={"f": 2}),
                "secure": True,
                "secure_bucket_size": 3,
                "min_participants": 10,
                "max_participants": 10,
            },
            FedLearnConfig(),
            "defends nothing below 5 buckets",
        ),
        ({"secure_bucket_size": 2}, FedLearnConfig(), "needs a secure round"),
        (
            {"secure": True, "clip_norm": 1.0, "clip_policy": "adaptive"},
            FedLearnConfig(),
            "use --clip-policy fixed",
        ),
        (
            {
                "aggregation": AggregationSpec(rule="fedavg", params={"norm_bound": 2.0}),
                "secure": True,
            },
            FedLearnConfig(),
            "set secure_bucket_size",
        ),
        ({"aggregation": AggregationSpec(rule="bulyan")}, FedLearnConfig(), "unknown rule"),
        (
            {"aggregation": AggregationSpec(rule="trimmed_mean", params={"beta": 0.7})},
            FedLearnConfig(),
            "beta",
        ),
        (  # Krum with f = 1 needs 5 updates; a round that may close with 3 cannot defend
            {"aggregation": AggregationSpec(rule="krum", params={"f": 1}), "min_participants": 3},
            FedLearnConfig(),
            "defends nothing below 5",
        ),
    ],
)
def test_draft_validation(make_manifest, overrides, config, fragment):
    with pytest.raises(HearthnetError) as exc:
        make_manifest(config, **overrides)
    assert exc.value.code is ErrorCode.MANIFEST_INVALID
    assert fragment in exc.value.message
    assert fragment in exc.value.message


@pytest.mark.parametrize(
    ("overrides", "config", "key", "flag"),
    [
        ({"lora_rank": 32}, FedLearnConfig(max_lora_rank=16), "max_lora_rank", "--rank"),
        (
            {"lora_target_modules": ("q_proj", "v_proj", "k_proj")},
            FedLearnConfig(max_lora_target_modules=2),
            "max_lora_target_modules",
            "--modules",
        ),
        ({"train_steps": 500}, FedLearnConfig(max_train_steps=100), "max_train_steps", "--steps"),
        (
            {"max_participants": 20},
            FedLearnConfig(max_round_participants=10),
            "max_round_participants",
            "--max-participants",
        ),
        ({"min_participants": 2}, FedLearnConfig(), "min_round_participants", "--min-participants"),
    ],
)
def test_node_limit_refusals_say_how_to_fix_them(make_manifest, overrides, config, key, flag):
    """Issue 12: a two-node round refused by `min_round_participants 3` must name the key to
    change and the announce flag, on whichever node refuses."""
    with pytest.raises(HearthnetError) as exc:
        make_manifest(config, **overrides)
    assert exc.value.code is ErrorCode.MANIFEST_INVALID
    assert f"[fedlearn] {key}" in exc.value.message and flag in exc.value.message


@pytest.mark.parametrize(
    "overrides",
    [
        {"lora_rank": 3},
        {"lora_rank": 65},
        {"lora_target_modules": ()},
        {"lora_target_modules": ("q_proj", "q_proj")},
        {"lora_target_modules": ("../etc",)},
        {"train_steps": 0},
        {"learning_rate": float("nan")},
        {"lora_dropout": 1.0},
        {"seed": 2**53},
        {"topic": "Has Spaces"},
        {"consent_text": ""},
        {"base_model_sha": "xyz"},
        {"batch_size": 0},
    ],
)
def test_draft_field_limits(overrides):
    fields = {**DRAFT, "deadline": datetime.now(UTC) + timedelta(hours=1), **overrides}
    with pytest.raises(ValueError):  # pydantic.ValidationError is a ValueError
        RoundManifestDraft(**fields)


def test_naive_deadline_is_refused(coordinator):
    draft = RoundManifestDraft(**DRAFT, deadline=datetime.now() + timedelta(hours=1))
    with pytest.raises(HearthnetError) as exc:
        draft.build(coordinator, FedLearnConfig())
    assert exc.value.code is ErrorCode.MANIFEST_INVALID


def test_from_request_fills_what_the_operator_left_out():
    config = FedLearnConfig(min_round_participants=2, max_round_participants=5)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    given = {"topic": "village", "consent_text": "ok", "lora_rank": 4}
    draft = RoundManifestDraft.from_request(given, config, "tiny-llama", "ab" * 32, now=now)
    assert draft.base_model_id == "tiny-llama" and draft.base_model_sha == "ab" * 32
    assert (draft.lora_rank, draft.lora_alpha) == (4, 8)  # alpha follows the operator's rank
    assert draft.lora_target_modules == ("q_proj", "v_proj") and draft.train_steps == 50
    assert (draft.min_participants, draft.max_participants) == (2, 5)  # from [fedlearn]
    assert draft.deadline == now + timedelta(hours=1)
    assert draft.dp_noise_scale is None and draft.clip_norm is None  # `build` fills these
    set_all = {**given, "lora_alpha": 3, "deadline_in_s": 60, "min_participants": 3}
    draft = RoundManifestDraft.from_request(set_all, config, "m", "ab" * 32, now=now)
    assert draft.lora_alpha == 3 and draft.min_participants == 3
    assert draft.deadline == now + timedelta(seconds=60)
    with raises_code(ErrorCode.MANIFEST_INVALID) as exc:
        RoundManifestDraft.from_request({**given, "deadline_in_s": 0}, config, "m", "ab" * 32)
    assert "--deadline-in" in exc.value.message
    with raises_code(ErrorCode.MANIFEST_INVALID) as exc:
        RoundManifestDraft.from_request({"topic": "village"}, config, "m", "ab" * 32)
    assert "consent_text" in exc.value.message  # no default: the operator writes it


def test_parse_reads_without_verifying_and_rejects_garbage(make_manifest):
    signed = make_manifest()
    wire = signed.to_wire()
    parsed = SignedManifest.parse(wire["body"], wire["signature"])
    assert (parsed.body, parsed.signature) == (signed.body, signed.signature)
    assert parsed.manifest == signed.manifest
    forged = SignedManifest.parse(wire["body"], "00" * 64)  # no verification on this path
    assert forged.manifest_sha == signed.manifest_sha
    for body, sig in ((wire["body"], "not hex"), ("{}", wire["signature"]), ("[", "00")):
        with raises_code(ErrorCode.SIGNATURE_INVALID) as exc:
            SignedManifest.parse(body, sig)
        assert exc.value.message == "manifest rejected"
    with raises_code(ErrorCode.SIGNATURE_INVALID):
        SignedManifest.from_wire({"body": wire["body"]}, roster=[signed.manifest.coordinator])
