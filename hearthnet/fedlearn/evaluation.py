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
import math
from typing import Any

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.manifest import RoundManifest
from hearthnet.fedlearn.protocol import EvaluationReport

EVENT = "fedlearn.adapter.evaluated"


def no_held_out_text(topic: str, where: str, for_apply: bool) -> HearthnetError:
    """The refusal when a node has no held-out text to judge an adapter on, naming where to put
    some (and, for apply, how to skip the check)."""
    fix = "; `fedlearn apply --force` applies it unjudged" if for_apply else ""
    return HearthnetError(
        ErrorCode.DATA_INVALID,
        f"this node has no held-out text for topic {topic!r} to judge the adapter on: put at "
        f"least {C.FEDLEARN_HELD_OUT_MIN_SAMPLES} texts in {where}/{topic}.txt (or .jsonl) and "
        f"keep [fedlearn] held_out_fraction above 0{fix}",
        {"topic": topic},
    )


def _finite(value: float) -> float | None:
    """Logged and sent as JSON, which has no NaN or infinity."""
    return value if math.isfinite(value) else None


async def judge(
    llm: Any,
    eventlog: Any,
    sha: str,
    manifest: RoundManifest,
    held_out: list[str],
    max_ratio: float,
    *,
    purpose: str,
    forced: bool,
) -> EvaluationReport:
    """Perplexity of `held_out` (at most FEDLEARN_EVAL_MAX_TEXTS texts) on the base model and
    with adapter `sha`, in worker threads (the node keeps answering), logged as an event."""
    if not llm.loaded:
        fix = "; `fedlearn apply --force` applies it unjudged" if purpose == "apply" else ""
        raise HearthnetError(
            ErrorCode.MODEL_UNAVAILABLE,
            "judging an adapter needs the base model loaded: set [llm] enabled = true in the "
            f"node's config and restart it{fix}",
        )
    texts = held_out[: C.FEDLEARN_EVAL_MAX_TEXTS]
    base = await asyncio.to_thread(llm.perplexity, texts, None)
    tuned = await asyncio.to_thread(llm.perplexity, texts, sha)
    ratio = tuned / base if math.isfinite(base) and math.isfinite(tuned) else math.nan
    fields: dict[str, Any] = {
        "sha": sha,
        "round_id": manifest.round_id,
        "topic": manifest.topic,
        "texts": len(texts),
        "perplexity_base": _finite(base),
        "perplexity_adapter": _finite(tuned),
        "ratio": _finite(ratio),
        "max_ratio": max_ratio,
        "passes": ratio <= max_ratio,  # False for NaN: a broken adapter never passes
    }
    event = await eventlog.append(EVENT, {**fields, "purpose": purpose, "forced": forced})
    return EvaluationReport(**fields, event_seq=event.seq)


async def record_unjudged(
    eventlog: Any, sha: str, manifest: RoundManifest, purpose: str, reason: HearthnetError
) -> None:
    """A forced apply that could not be judged says why in the log."""
    body = {"sha": sha, "round_id": manifest.round_id, "topic": manifest.topic}
    unjudged = {"purpose": purpose, "forced": True, "unjudged": reason.code.value}
    await eventlog.append(EVENT, {**body, **unjudged})
