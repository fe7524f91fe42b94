"""Judging adapters on held-out text: every verdict is logged, a broken adapter never passes."""

import math

import pytest

from hearthnet.eventlog import EventLog
from hearthnet.fedlearn import evaluation
from hearthnet.fedlearn.peft_adapter import write_peft_adapter
from tests.helpers import loaded_service
from tests.llm.test_service import random_adapter

HELD_OUT = [
    "The siren test happens on the first Saturday of each month.",
    "Bulky waste is collected on the first Thursday of each month.",
]


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    return loaded_service(tiny_model_dir, tmp_path_factory.mktemp("node"))


@pytest.mark.parametrize(
    ("scale", "passes"),
    [(0.0, True), (1e30, False), (math.nan, False)],
    ids=["no-op adapter", "huge adapter", "nan adapter"],
)
async def test_a_verdict_is_logged_and_a_broken_adapter_never_passes(
    service, make_manifest, tmp_path, identity, scale, passes
):
    signed = make_manifest(lora_rank=4, lora_target_modules=("q_proj", "v_proj"))
    sha = {0.0: "a0", 1e30: "a1"}.get(scale, "a2") * 32
    adapter = random_adapter(signed.manifest, service.model_shapes, 3, scale=1.0)
    adapter = {k: v * scale if k.endswith("lora_B") else v for k, v in adapter.items()}
    service.register_adapter(
        sha, write_peft_adapter(adapter, signed.manifest, "tiny", tmp_path / sha)
    )
    log = EventLog(tmp_path / "events.db", identity)
    try:
        report = await evaluation.judge(
            service, log, sha, signed.manifest, HELD_OUT, 1.0, purpose="evaluate", forced=False
        )
        assert report.passes is passes and report.texts == 2
        if passes:
            assert report.ratio == 1.0  # B = 0: the adapter changes nothing
        elif math.isnan(scale):  # not finite: None on the wire and in the log, never a pass
            assert report.perplexity_adapter is None and report.ratio is None
            assert report.perplexity_base is not None and report.perplexity_base > 1
        else:  # B·A of 1e30: saturated, about uniform over the vocabulary, and worse
            assert report.ratio is not None and report.ratio > 1.0
        (event,) = await log.read_all(evaluation.EVENT)
        assert event.seq == report.event_seq
        assert event.payload["passes"] is passes and event.payload["purpose"] == "evaluate"
        assert event.payload["perplexity_adapter"] == report.perplexity_adapter
    finally:
        await log.close()
