"""The participant driver's blocking work: training, masking, calls that retry.

Each runs what would stall the event loop in a thread (training for minutes, parsing and
masking up to 64 MiB) and returns plain values for the machine (docs/architecture.md,
"Federated rounds").
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from typing import Any

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.aggregation.secure import mask_delta, serialize_masked
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.data import TrainingDataProvider
from hearthnet.fedlearn.delta import Delta, deserialize_delta, serialize_delta
from hearthnet.fedlearn.machines.effects import Call
from hearthnet.fedlearn.machines.participant import Submit, TrainOutcome
from hearthnet.fedlearn.manifest import SignedManifest
from hearthnet.fedlearn.state import Membership
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn.participant")

_RETRY_S = 1.0


async def train(
    ctx: FedContext,
    provider: TrainingDataProvider,
    lock: asyncio.Lock,
    cancel: threading.Event,
    member: Membership,
) -> tuple[TrainOutcome, Delta]:
    """Train on the manifest's topic (one training at a time: `lock`) and store the delta.

    Also returns the delta's tensors as stored (CPU, in the file's key order), so a secure
    round masks them without reading back and parsing its own blob (docs/decisions.md)."""
    m = member.signed.manifest
    from hearthnet.fedlearn.trainer import QLoRATrainer

    async with lock:
        samples = await asyncio.to_thread(provider.samples, m.topic)
        # off the loop: on a node that never loaded the model this converts a GGUF (~25 s)
        model_dir = await asyncio.to_thread(lambda: ctx.llm.model_dir)
        trainer = QLoRATrainer(model_dir, ctx.llm.device)
        log.info("training", round_id=member.round_id, samples=len(samples), steps=m.train_steps)
        result = await asyncio.to_thread(trainer.train, m, samples, cancel=cancel)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(result.delta.items())}
    data = serialize_delta(
        tensors,
        manifest_sha=member.signed.manifest_sha,
        round_id=member.round_id,
        participant=ctx.node_id,
    )
    sha = await asyncio.to_thread(ctx.blobs.put, data)
    log.info(
        "trained",
        round_id=member.round_id,
        loss=round(result.train_loss, 4),
        steps=result.steps,
        of=m.train_steps,
        stopped_early=result.stopped_early,
    )
    outcome = TrainOutcome(
        sha,
        result.num_samples,
        result.train_loss,
        result.steps,
        result.stopped_early,
        result.clip_bit,
    )
    return outcome, tensors


async def submission_bytes(
    ctx: FedContext, signed: SignedManifest, eff: Submit, trained: Delta | None = None
) -> bytes:
    """The bytes to submit: the trained delta, masked over the share set in a secure round.

    `trained` is the delta's tensors as `train` stored them; without it (the node restarted
    since training) the stored blob is read and parsed."""
    if eff.key is None or eff.plan is None or eff.shared is None:
        return await asyncio.to_thread(ctx.blobs.get, eff.trained_sha)
    key, plan, shared = eff.key, eff.plan, eff.shared
    shapes = ctx.model_shapes()
    me = ctx.node_id

    def masked() -> bytes:  # parsing and masking up to 64 MiB: off the event loop
        delta = trained
        if delta is None:
            delta, _ = deserialize_delta(ctx.blobs.get(eff.trained_sha))
            delta = dict(sorted(delta.items()))  # the file's order, as `train` returns it
        vec = mask_delta(delta, key, me, plan, shared, signed.manifest, shapes)
        return serialize_masked(
            vec, manifest_sha=signed.manifest_sha, round_id=signed.round_id, participant=me
        )

    return await asyncio.to_thread(masked)


async def call_with_retry(
    ctx: FedContext, call: Call, timeout: float, response_model: Any = None
) -> tuple[Any, bytes | None]:
    """Make a machine's call, retrying an unreachable peer until `call.retry_until`."""
    peer = None if call.peer == ctx.node_id else call.peer
    while True:
        try:
            return await ctx.bus.call_blob(
                call.capability,
                call.body,
                peer=peer,
                timeout=timeout,
                blob=call.blob,
                response_model=response_model,
            )
        except HearthnetError as err:
            if err.code not in (ErrorCode.PEER_NOT_CONNECTED, ErrorCode.TIMEOUT):
                raise
            if call.retry_until is None or datetime.now(UTC) >= call.retry_until:
                raise HearthnetError(
                    ErrorCode.FEDLEARN_AGGREGATOR_UNREACHABLE,
                    "the coordinator was unreachable until the deadline",
                ) from None
        await asyncio.sleep(_RETRY_S)
