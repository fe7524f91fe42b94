"""Using a published adapter here: judge it on this node's held-out text (`adapter.evaluate`),
and apply it to a session or as the node default (`adapter.apply`, judged first for the node).

Every judgement, and every apply that `--force` let through unjudged, is logged
(`evaluation.judge`, `evaluation.record_unjudged`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn import evaluation
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.participant import RoundParticipant
from hearthnet.fedlearn.protocol import ApplyReceipt, ApplyRequest, EvaluationReport
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn")


def _num(value: float | None, digits: int = 2) -> str:
    return "not finite" if value is None else f"{value:.{digits}f}"


class AdapterUse:
    """Judges and applies adapters that `published` says this node may use."""

    def __init__(
        self, ctx: FedContext, participant: RoundParticipant, published: Callable[[str], bool]
    ):
        self.ctx = ctx
        self.participant = participant
        self.published = published

    def _known(self, sha: str) -> None:
        if not self.published(sha):
            raise HearthnetError(ErrorCode.ADAPTER_NOT_FOUND, f"no adapter {sha}")

    async def judge(self, sha: str, purpose: str, force: bool) -> EvaluationReport | None:
        """Judge a published adapter on this node's held-out text and log the judgement; None
        (also logged) when `force` lets an apply go ahead without one."""
        self._known(sha)
        m = (await self.participant.install_adapter(sha)).manifest
        provider = self.participant.provider
        try:
            held = await asyncio.to_thread(provider.held_out, m.topic)
            if not held:
                where = str(getattr(provider, "root", "the training data folder"))
                raise evaluation.no_held_out_text(m.topic, where, purpose == "apply")
            verdict = await evaluation.judge(
                self.ctx.llm,
                self.ctx.eventlog,
                sha,
                m,
                held,
                self.ctx.config.fedlearn.apply_max_perplexity_ratio,
                purpose=purpose,
                forced=force,
            )
        except HearthnetError as err:
            if not force:
                raise
            await evaluation.record_unjudged(self.ctx.eventlog, sha, m, purpose, err)
            log.warning("adapter applied unjudged", sha=sha, reason=err.message)
            return None
        if not verdict.passes and not force:
            raise HearthnetError(
                ErrorCode.ADAPTER_REJECTED,
                f"the adapter makes this node's held-out text worse: perplexity "
                f"{_num(verdict.perplexity_base)} -> {_num(verdict.perplexity_adapter)} on "
                f"{verdict.texts} texts of topic {m.topic!r} (ratio {_num(verdict.ratio, 3)}, "
                f"allowed {verdict.max_ratio}); raise [fedlearn] apply_max_perplexity_ratio or "
                "pass --force to apply it anyway",
                verdict.model_dump(),
            )
        return verdict

    async def evaluate(self, sha: str) -> EvaluationReport:
        """The held-out judgement alone; a failure to judge raises."""
        report = await self.judge(sha, "evaluate", force=False)
        assert report is not None  # without force, a failure raises
        return report

    async def apply(self, req: ApplyRequest) -> ApplyReceipt:
        """A new session with the adapter, or (judged first) the node's default adapter."""
        self._known(req.sha)
        llm = self.ctx.llm
        if req.scope == "node":
            report = await self.judge(req.sha, "apply", req.force)
            llm.set_node_adapter(req.sha)
            log.info("node adapter set", sha=req.sha, forced=req.force, judged=report is not None)
            return ApplyReceipt(
                sha=req.sha,
                scope="node",
                session_id=None,
                node_default=req.sha,
                evaluation=report,
                forced=req.force,
            )
        await self.participant.install_adapter(req.sha)
        session = llm.open_session(req.sha)
        return ApplyReceipt(
            sha=req.sha, scope="session", session_id=session.id, node_default=llm.node_default
        )
