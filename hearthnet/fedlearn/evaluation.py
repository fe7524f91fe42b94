"""Judging an adapter on this node's own held-out text before the node trusts it.

A round's result can be bad for reasons no aggregation rule sees: a poisoned round that got past
the rules, a base model that differs in some way the SHA does not capture, a broken install. So a
node measures before it makes an adapter its default: held-out perplexity of its own text for the
round's topic (fedlearn/data.py keeps that slice out of training) with and without the adapter.
`apply --scope node` refuses an adapter that makes it worse than `[fedlearn]
apply_max_perplexity_ratio` allows, unless the operator forces it; every judgement, forced or
not, is a `fedlearn.adapter.evaluated` event in the node's log.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError

EVENT = "fedlearn.adapter.evaluated"


@dataclass(frozen=True)
class Judgement:
    """Held-out perplexity with and without an adapter, and whether it passes the bound."""

    sha: str
    round_id: str
    topic: str
    texts: int
    perplexity_base: float
    perplexity_adapter: float
    max_ratio: float

    @property
    def ratio(self) -> float:
        return self.perplexity_adapter / self.perplexity_base

    @property
    def passes(self) -> bool:
        return self.ratio <= self.max_ratio

    def payload(self, purpose: str, forced: bool) -> dict[str, Any]:
        return {
            "adapter_sha": self.sha,
            "round_id": self.round_id,
            "topic": self.topic,
            "texts": self.texts,
            "perplexity_base": round(self.perplexity_base, 6),
            "perplexity_adapter": round(self.perplexity_adapter, 6),
            "ratio": round(self.ratio, 6),
            "max_ratio": self.max_ratio,
            "passes": self.passes,
            "purpose": purpose,
            "forced": forced,
        }


def no_held_out_text(topic: str, where: str, for_apply: bool) -> HearthnetError:
    fix = "; `fedlearn apply --force` applies it unjudged" if for_apply else ""
    return HearthnetError(
        ErrorCode.DATA_INVALID,
        f"this node has no held-out text for topic {topic!r} to judge the adapter on: put at "
        f"least {C.FEDLEARN_HELD_OUT_MIN_SAMPLES} texts in {where}/{topic}.txt (or .jsonl) and "
        f"keep [fedlearn] held_out_fraction above 0{fix}",
        {"topic": topic},
    )


async def judge(
    llm: Any, sha: str, round_id: str, topic: str, held_out: list[str], max_ratio: float
) -> Judgement:
    """Perplexity of `held_out` (at most FEDLEARN_EVAL_MAX_TEXTS texts) on the base model and
    with adapter `sha`, in worker threads: the node keeps answering meanwhile."""
    if not llm.loaded:
        raise HearthnetError(
            ErrorCode.MODEL_UNAVAILABLE,
            "judging an adapter needs the base model loaded: set [llm] enabled = true",
        )
    texts = held_out[: C.FEDLEARN_EVAL_MAX_TEXTS]
    base = await asyncio.to_thread(llm.perplexity, texts, None)
    tuned = await asyncio.to_thread(llm.perplexity, texts, sha)
    return Judgement(sha, round_id, topic, len(texts), base, tuned, max_ratio)
