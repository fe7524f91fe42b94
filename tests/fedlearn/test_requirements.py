"""Join checks (fedlearn/requirements.py): a node refuses a round on another base model or over
its training budget, from the facts of a prepared model (no weights are loaded)."""

import pytest

from hearthnet.config import FedLearnConfig, LLMSection
from hearthnet.errors import ErrorCode
from hearthnet.fedlearn.requirements import (
    check_base_model,
    check_resources,
    estimate_training_resources,
)
from hearthnet.llm.service import LLMService
from tests.helpers import raises_code

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def prepared(model_dir, data_dir) -> LLMService:
    svc = LLMService(LLMSection(base_model=model_dir, device="cpu"), data_dir)
    svc.prepare()
    return svc


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return prepared(tiny_model_dir, tmp_path_factory.mktemp("node"))


def test_resources_and_base_model_checks(tiny, make_manifest):
    assert not tiny.loaded  # the checks need the model's facts, not its weights
    small = make_manifest(lora_rank=4).manifest
    est = check_resources(small, tiny, FedLearnConfig())
    assert est.vram_mb > 0 and est.disk_mb >= 0
    big = make_manifest(
        lora_rank=64, batch_size=256, lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    ).manifest
    need = estimate_training_resources(big, tiny)
    assert need.vram_mb > est.vram_mb and need.disk_mb >= est.disk_mb
    with raises_code(ErrorCode.INSUFFICIENT_RESOURCES, match="training_vram_budget_mb") as exc:
        check_resources(big, tiny, FedLearnConfig(training_vram_budget_mb=1))
    assert exc.value.detail == {"vram_mb": need.vram_mb, "disk_mb": need.disk_mb}
    exact = {"training_vram_budget_mb": need.vram_mb, "training_disk_budget_mb": need.disk_mb}
    assert check_resources(big, tiny, FedLearnConfig(**exact)) == need  # the budget is inclusive
    for key in exact:
        with raises_code(ErrorCode.INSUFFICIENT_RESOURCES, match=key):
            check_resources(big, tiny, FedLearnConfig(**{**exact, key: exact[key] - 1}))
    with raises_code(ErrorCode.BASE_MODEL_MISMATCH):
        check_base_model(small, tiny)  # the draft's sha is not this model's
    check_base_model(small.model_copy(update={"base_model_sha": tiny.base_model_sha}), tiny)


def test_a_target_module_the_model_lacks_is_refused(tiny, make_manifest):
    manifest = make_manifest(lora_target_modules=("q_proj", "no_such_proj")).manifest
    with raises_code(ErrorCode.MANIFEST_INVALID, match="no_such_proj"):
        estimate_training_resources(manifest, tiny)


def test_join_checks_on_the_real_model(smollm_dir, make_manifest, tmp_path):
    smollm = prepared(smollm_dir, tmp_path / "node")
    fields = {"base_model_id": smollm.base_model_id, "lora_rank": 8, "batch_size": 4}
    ok = make_manifest(base_model_sha=smollm.base_model_sha, **fields).manifest
    check_base_model(ok, smollm)
    assert check_resources(ok, smollm, FedLearnConfig()).vram_mb <= 8192
    wrong = ok.model_copy(update={"base_model_sha": "0" * 64})
    with raises_code(ErrorCode.BASE_MODEL_MISMATCH):
        check_base_model(wrong, smollm)
    oversized = make_manifest(
        base_model_sha=smollm.base_model_sha,
        **{**fields, "lora_rank": 64, "batch_size": 256},
        lora_target_modules=ALL_LINEAR,
    ).manifest
    with raises_code(ErrorCode.INSUFFICIENT_RESOURCES) as exc:
        check_resources(oversized, smollm, FedLearnConfig())
    assert exc.value.detail["vram_mb"] > 8192
