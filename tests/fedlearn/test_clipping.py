"""Adaptive clipping (hearthnet/fedlearn/clipping.py): the update rule, the accounting of the
bit's noise, the manifest's clip policy, the trainer's bit, and on the real 4-bit SmolLM2 that
a default-configured round keeps its delta (the old default clip 1.0 did not)."""

import math
import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import torch

from hearthnet import constants as C
from hearthnet.config import FedLearnConfig
from hearthnet.errors import ErrorCode
from hearthnet.fedlearn import budget, clipping
from hearthnet.fedlearn.clipping import AdaptiveClip
from hearthnet.fedlearn.lora import A_SUFFIX, B_SUFFIX, complete_adapter
from hearthnet.fedlearn.manifest import RoundManifest
from hearthnet.fedlearn.privacy import clip_gradient, global_norm
from hearthnet.fedlearn.trainer import QLoRATrainer
from hearthnet.identity import NodeIdentity
from tests.helpers import raises_code

POLICY = AdaptiveClip(quantile=0.5, learning_rate=0.2, count_noise=0.0)


def test_next_clip_is_the_geometric_update():
    assert clipping.next_clip(10.0, 0.5, POLICY) == pytest.approx(10.0)
    assert clipping.next_clip(10.0, 1.0, POLICY) == pytest.approx(10.0 * math.exp(-0.1))
    assert clipping.next_clip(10.0, 0.0, POLICY) == pytest.approx(10.0 * math.exp(0.1))
    # a noised b̄ outside [0, 1] still gives a positive clip
    assert clipping.next_clip(10.0, -3.0, POLICY) == pytest.approx(10.0 * math.exp(0.7))


def test_the_clip_converges_to_the_target_quantile_of_the_norms():
    norms = [float(n) for n in range(1, 101)]  # the median is ~50
    policy = AdaptiveClip(quantile=0.5, learning_rate=0.2, count_noise=0.0)
    clip = 1.0
    for _ in range(200):
        clip = clipping.next_clip(
            clip, clipping.mean_bit(clipping.unclipped_bit(n, clip) for n in norms), policy
        )
    assert 45 <= clip <= 56
    low = AdaptiveClip(quantile=0.1, learning_rate=0.2, count_noise=0.0)
    clip = 50.0
    for _ in range(200):
        clip = clipping.next_clip(
            clip, clipping.mean_bit(clipping.unclipped_bit(n, clip) for n in norms), low
        )
    assert 6 <= clip <= 16


def test_carry_over_keeps_the_noise_multiplier():
    clip, noise = clipping.carry_over(10.0, 5.0, 1.0, POLICY)
    assert clip < 10.0
    assert noise / clip == pytest.approx(0.5)


def test_the_bit_counts_norm_at_the_clip_as_unclipped_and_adds_its_noise():
    assert clipping.unclipped_bit(2.0, 2.0) == 1.0
    assert clipping.unclipped_bit(2.0 + 1e-9, 2.0) == 0.0
    assert clipping.noised_bit(1.0, 2.0, 0.5, -2.0) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        clipping.mean_bit([])
    with pytest.raises(ValueError):
        clipping.mean_bit([1.0, math.nan])


def test_effective_multiplier_is_theorem_1_and_inverts():
    z = clipping.effective_multiplier(2.0, 1.5)
    assert z == pytest.approx((2.0**-2 + 3.0**-2) ** -0.5)
    assert z < 2.0  # releasing the bit costs privacy
    assert clipping.delta_multiplier(z, 1.5) == pytest.approx(2.0)
    assert clipping.effective_multiplier(2.0, 0.0) == 0.0  # an exact bit: no privacy
    with pytest.raises(ValueError, match="σ_b > 1"):
        clipping.delta_multiplier(2.0, 1.0)


@pytest.mark.parametrize(
    "fields", [{"quantile": 0.0}, {"quantile": 1.0}, {"learning_rate": 0.0}, {"count_noise": -1}]
)
def test_a_bad_policy_is_refused(fields: dict[str, float]):
    with pytest.raises(ValueError):
        AdaptiveClip(**{"quantile": 0.5, "learning_rate": 0.2, "count_noise": 0.0, **fields})


def test_default_drafts_clip_adaptively_from_the_measured_norm(make_manifest):
    m = make_manifest().manifest
    assert (m.clip_policy, m.clip_norm, m.clip_quantile, m.clip_learning_rate) == (
        "adaptive",
        C.FEDLEARN_CLIP_NORM_DEFAULT,
        0.5,
        0.2,
    )
    assert m.clip_count_noise == 0.0  # no DP noise: the bit goes exact, ε is ∞ anyway
    assert math.isinf(budget.round_epsilon(m, 1e-5))
    noisy = make_manifest(dp_noise_scale=48.0).manifest
    assert noisy.clip_count_noise == 48.0 / C.FEDLEARN_CLIP_NORM_DEFAULT  # σ_b = z_Δ
    assert budget.noise_multiplier(noisy) == pytest.approx(2.0 * 1.25**-0.5)
    set_noise = FedLearnConfig(clip_count_noise_default=5.0)
    assert make_manifest(set_noise, dp_noise_scale=48.0).manifest.clip_count_noise == 5.0
    assert make_manifest(clip_norm=0.0).manifest.clip_policy == "fixed"


def test_epsilon_accounts_the_bits_noise(make_manifest):
    fixed = make_manifest(dp_noise_scale=48.0, clip_norm=24.0, clip_policy="fixed").manifest
    adaptive = make_manifest(dp_noise_scale=48.0, clip_norm=24.0, clip_count_noise=1.5).manifest
    assert budget.noise_multiplier(fixed) == pytest.approx(2.0)
    assert budget.noise_multiplier(adaptive) == pytest.approx((2.0**-2 + 3.0**-2) ** -0.5)
    assert budget.round_epsilon(adaptive, 1e-5) > budget.round_epsilon(fixed, 1e-5)


def test_adaptive_dp_without_bit_noise_is_not_a_valid_manifest(make_manifest):
    with raises_code(ErrorCode.MANIFEST_INVALID, "clip_count_noise > 0"):
        make_manifest(dp_noise_scale=1.0, clip_norm=24.0, clip_count_noise=0.0)
    with raises_code(ErrorCode.MANIFEST_INVALID, "adaptive clipping needs clip_norm > 0"):
        make_manifest(clip_norm=0.0, clip_policy="adaptive")


def test_the_next_draft_of_the_topic_carries_the_clip(make_manifest):
    from hearthnet.fedlearn.manifest import RoundManifestDraft
    from tests.fedlearn.conftest import DRAFT

    prev = make_manifest(dp_noise_scale=48.0).manifest  # adaptive, C = 24, z_Δ = 2
    draft = RoundManifestDraft(**DRAFT, deadline=datetime.now(UTC) + timedelta(hours=1))
    carried = draft.with_carried_clip(prev, [1.0, 1.0, 1.0, None])  # all unclipped: shrink
    assert carried.clip_norm == pytest.approx(24.0 * math.exp(-0.2 * 0.5))
    assert carried.dp_noise_scale == pytest.approx(2.0 * carried.clip_norm)
    built = carried.build(NodeIdentity.generate(), FedLearnConfig())
    assert built.manifest.clip_norm == pytest.approx(carried.clip_norm)
    assert budget.noise_multiplier(built.manifest) == pytest.approx(budget.noise_multiplier(prev))
    grown = draft.with_carried_clip(prev, [0.0, 0.0, 0.0])
    assert grown.clip_norm == pytest.approx(24.0 * math.exp(0.1))
    own = draft.model_copy(update={"clip_norm": 3.0})
    assert own.with_carried_clip(prev, [1.0]).clip_norm == 3.0  # the operator's clip wins
    other = draft.model_copy(update={"topic": "other"})
    assert other.with_carried_clip(prev, [1.0]) is other
    assert draft.with_carried_clip(prev, [None]) is draft
    fixed = make_manifest(clip_policy="fixed").manifest
    assert draft.with_carried_clip(fixed, [1.0]) is draft


def test_the_bit_is_signed_with_the_submission():
    from hearthnet.fedlearn.submission import ParticipantSubmission

    ident = NodeIdentity.generate()
    round_id = "01J0000000000000000000000A"
    sub = ParticipantSubmission.create(ident, round_id, b"delta", 10, 0.5, clip_bit=0.75)
    sub.verify(b"delta")
    forged = sub.model_copy(update={"clip_bit": 0.25})
    with raises_code(ErrorCode.SIGNATURE_INVALID, "signature is invalid"):
        forged.verify(b"delta")
    plain = ParticipantSubmission.create(ident, round_id, b"delta", 10, 0.5)
    assert plain.clip_bit is None
    plain.verify(b"delta")


TEXTS = [f"The market opens at {h} o'clock on day {d}." for h in range(6, 12) for d in range(4)]


def test_the_trainer_reports_the_bit_before_clipping(make_manifest, tiny_model_dir):
    kw: dict[str, Any] = {"lora_rank": 4, "train_steps": 4, "learning_rate": 5e-2}
    tight = QLoRATrainer(tiny_model_dir).train(make_manifest(clip_norm=1e-4, **kw).manifest, TEXTS)
    assert tight.clip_bit == 0.0 and global_norm(tight.delta) <= 1e-4
    loose = QLoRATrainer(tiny_model_dir).train(make_manifest(clip_norm=1e4, **kw).manifest, TEXTS)
    assert loose.clip_bit == 1.0
    fixed = make_manifest(clip_norm=1e-4, clip_policy="fixed", **kw).manifest
    assert QLoRATrainer(tiny_model_dir).train(fixed, TEXTS).clip_bit is None
    secure = make_manifest(clip_norm=1e-4, secure=True).manifest  # fixed: no plain bit there
    assert secure.clip_policy == "fixed"
    assert QLoRATrainer(tiny_model_dir).train(secure, TEXTS).clip_bit is None
    noisy = make_manifest(clip_norm=1e4, dp_noise_scale=1e-6, clip_count_noise=0.5, **kw)
    bits = {QLoRATrainer(tiny_model_dir).train(noisy.manifest, TEXTS).clip_bit for _ in range(2)}
    assert len(bits) == 2 and all(b is not None and b != 1.0 for b in bits)


# The real 4-bit SmolLM2-135M in the demo's setting (rank 8 on q/k/v/o, 30 steps, lr 3e-3).
THINGS = ["bake sale", "book swap", "choir practice", "clean-up day", "repair café"]


def notice(i: int) -> str:
    return (
        f"Hearthdale notice: the {THINGS[i % len(THINGS)]} takes place on day {i % 7} at "
        f"{8 + i % 10} o'clock at the village hall. Bring a friend — the Hearthdale board"
    )


def perplexity(model_dir: Any, m: RoundManifest, adapter: dict[str, torch.Tensor] | None) -> float:
    from peft import LoraConfig, get_peft_model

    from hearthnet.llm import model as M

    tokenizer = M.load_tokenizer(model_dir)
    lora = LoraConfig(
        r=m.lora_rank,
        lora_alpha=m.lora_alpha,
        target_modules=list(m.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(M.load_4bit(model_dir, "cpu"), lora).eval()
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A"):
            b = module.lora_B["default"].weight
            with torch.no_grad():
                if adapter is None:
                    b.zero_()
                else:
                    module.lora_A["default"].weight.copy_(adapter[name + A_SUFFIX])
                    b.copy_(adapter[name + B_SUFFIX])
    batch = tokenizer([notice(i) for i in range(100, 116)], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return math.exp(float(model(**batch, labels=labels).loss))


def test_a_default_configured_round_keeps_its_delta(smollm_dir):
    from hearthnet.fedlearn.manifest import RoundManifestDraft
    from hearthnet.llm import model as M

    sha = smollm_dir.name  # the converted cache folder is named by the weights' SHA-256

    def manifest(**kw: Any) -> RoundManifest:
        draft = RoundManifestDraft(
            base_model_id="SmolLM2-135M-Instruct",
            base_model_sha=sha,
            lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            lora_rank=8,
            lora_alpha=16,
            train_steps=30,
            learning_rate=3e-3,
            batch_size=4,
            seed=11,
            min_participants=1,
            max_participants=4,
            topic="hearthdale",
            consent_text="test",
            deadline=datetime.now(UTC) + timedelta(hours=1),
            **kw,
        )
        return draft.build(
            NodeIdentity.generate(), FedLearnConfig(min_round_participants=1)
        ).manifest

    default = manifest()  # clip and policy from the node's default config
    assert default.clip_policy == "adaptive"
    shards = [[notice(i) for i in range(k, 48, 2)] for k in range(2)]
    trainer = QLoRATrainer(smollm_dir)
    raw = [trainer.train(manifest(clip_norm=0.0), s).delta for s in shards]
    norms = [global_norm(d) for d in raw]
    results = [trainer.train(default, s) for s in shards]
    assert [r.clip_bit for r in results] == [float(n <= default.clip_norm) for n in norms]
    shapes = M.linear_shapes(smollm_dir)

    def mean(deltas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        avg = {k: torch.stack([d[k] for d in deltas]).mean(0) for k in deltas[0]}
        return complete_adapter(avg, default, shapes)

    base = perplexity(smollm_dir, default, None)
    unclipped = perplexity(smollm_dir, default, mean(raw))
    with_default = perplexity(smollm_dir, default, mean([r.delta for r in results]))
    old_default = perplexity(smollm_dir, default, mean([clip_gradient(d, 1.0) for d in raw]))
    print(f"norms {norms}; ppl base {base:.2f}, unclipped {unclipped:.2f}, ", end="")
    print(f"default {with_default:.2f}, old clip 1.0 {old_default:.2f}")
    assert statistics.median(norms) > 5 * 1.0  # why the old default collapsed the delta
    assert unclipped < base / 10
    assert with_default <= 1.15 * unclipped  # the default keeps (nearly) all of the gain
    assert old_default > 3 * with_default  # ... which the old clip of 1.0 lost


def test_the_coordinator_carries_the_clip_from_the_topics_last_result(tmp_path):
    from hearthnet.blobs import BlobStore
    from hearthnet.fedlearn.manifest import RoundID, format_ts
    from hearthnet.fedlearn.protocol import RoundResult, SignedDoc, SubmissionRef
    from hearthnet.fedlearn.state import Phase
    from hearthnet.fedlearn.submission import ParticipantSubmission
    from tests.fedlearn.machines.harness import (
        BASE_SHA,
        T0,
        CoordinatorHarness,
        MemoryLog,
        draft,
        node_config,
        submission,
    )

    me = NodeIdentity.generate()
    harness = CoordinatorHarness(
        me, node_config(tmp_path), BlobStore(tmp_path / "blobs"), MemoryLog(me)
    )
    signed = harness.announce(dp_noise_scale=48.0)
    assert signed.manifest.clip_policy == "adaptive" and signed.manifest.clip_norm == 24.0
    refs = []
    for i, p in enumerate(NodeIdentity.generate() for _ in range(3)):
        sub, data = submission(p, signed, seed=i)
        bit = 1.0 if i else 0.0  # b̄ = 2/3: more unclipped than γ = 0.5, so the clip shrinks
        sub = ParticipantSubmission.create(p, sub.round_id, data, 4, 1.5, steps=10, clip_bit=bit)
        refs.append(
            SubmissionRef(**sub.model_dump(exclude={"round_id", "train_loss", "submitted_at"}))
        )
    result = RoundResult(
        round_id=signed.manifest.round_id,
        manifest_sha=signed.manifest_sha,
        aggregated_delta_sha="ab" * 32,
        n_participants=3,
        total_samples=12,
        aggregator=me.node_id,
        completed_at=format_ts(T0),
        download_url="hearthnet://blob/" + "ab" * 32,
        rule="fedavg",
        lora_aggregation="frozen_a",
        secure=False,
        included=sorted(r.participant for r in refs),
        excluded=[],
        takeover=False,
        submissions=refs,
    )
    # the round as the coordinator's log leaves it once completed
    record = harness.machine.get(signed.manifest.round_id)
    record.result, record.phase = SignedDoc.sign(me, result), Phase.COMPLETED
    later = T0 + timedelta(minutes=5)
    nxt, _ = harness.machine.announce(
        draft(), BASE_SHA, later, RoundID("01JWM2P3T9Q8XKZ4N6V7B5C0DF")
    )
    want = 24.0 * math.exp(-0.2 * (2 / 3 - 0.5))
    assert nxt.manifest.clip_norm == pytest.approx(want)
    assert nxt.manifest.dp_noise_scale == pytest.approx(2.0 * want)  # z_Δ kept
    other, _ = harness.machine.announce(
        draft(topic="other-topic"), BASE_SHA, later, RoundID("01JWM2P3T9Q8XKZ4N6V7B5C0DG")
    )
    assert other.manifest.clip_norm == 24.0


def test_the_participant_signs_its_trained_bit_into_the_submission_across_a_restart(
    coordinator, make_manifest
):
    from hearthnet.fedlearn.machines.participant import TrainOutcome
    from hearthnet.fedlearn.submission import ParticipantSubmission
    from tests.fedlearn.machines.test_participant import TRAINED_SHA, Node

    signed = make_manifest(dp_noise_scale=48.0)
    node = Node(coordinator, signed)
    node.join()
    node.run(node.machine.trained(TrainOutcome(TRAINED_SHA, 4, 1.5, 10, False, 0.375)))
    machine = node.restarted()  # the bit comes back from the log
    call = machine.submission(b"delta bytes", "cd" * 32)
    sub = ParticipantSubmission.model_validate(call.body["submission"])
    assert sub.clip_bit == 0.375
    sub.verify(b"delta bytes")


def test_a_secure_draft_defaults_to_a_fixed_clip(make_manifest):
    """The node's default policy is adaptive, but a secure round's bit would have to travel
    masked (not built): its draft takes a fixed clip instead of a policy it cannot keep."""
    signed = make_manifest(secure=True, clip_norm=2.0)
    assert signed.manifest.clip_policy == "fixed"
    assert make_manifest(clip_norm=2.0).manifest.clip_policy == "adaptive"
