"""A participant's signed submission, and how its num_samples claim is capped.

Light on purpose (docs/decisions.md, issue 14): wire messages and the event fold import this,
so it needs only pydantic and the node's signing key, never torch.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from hearthnet import constants as C
from hearthnet.canonical import canonical_bytes, sha256_hex
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.manifest import format_ts
from hearthnet.identity import NodeID, NodeIdentity, verify


class ParticipantSubmission(BaseModel):
    """A participant's signed claim about its delta; the bytes travel as a blob.

    The signature covers the JCS of (purpose, round_id, participant, delta_sha, num_samples)
    plus `steps` (training steps run, of the manifest's `train_steps`) when present — absent
    only in submissions from before it was added, which still verify; `train_loss` and
    `submitted_at` are telemetry and are not signed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    round_id: Annotated[str, Field(min_length=26, max_length=26)]
    participant: Annotated[str, Field(max_length=128)]
    delta_sha: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    num_samples: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_NUM_SAMPLES)]
    train_loss: Annotated[float, Field(allow_inf_nan=False)]
    submitted_at: str
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]
    steps: Annotated[int, Field(ge=1, le=C.FEDLEARN_MAX_TRAIN_STEPS)] | None = None
    # adaptive clipping's noised bit 1[‖Δ‖ ≤ clip_norm] (fedlearn/clipping.py); signed, so the
    # round's result lists it and anyone can recompute the topic's next clip
    clip_bit: Annotated[float, Field(allow_inf_nan=False)] | None = None

    @staticmethod
    def signing_bytes(
        round_id: str,
        participant: str,
        delta_sha: str,
        num_samples: int,
        steps: int | None,
        clip_bit: float | None = None,
    ) -> bytes:
        """The canonical bytes a participant signs: the round, itself, its delta's hash and
        weight, under a purpose string so the signature cannot be replayed as another
        document."""
        signed: dict[str, str | int] = {
            "purpose": C.FEDLEARN_SUBMISSION_PURPOSE,
            "round_id": round_id,
            "participant": participant,
            "delta_sha": delta_sha,
            "num_samples": num_samples,
        }
        if steps is not None:
            signed["steps"] = steps
        if clip_bit is not None:
            signed["clip_bit"] = float(clip_bit).hex()  # exact, one spelling
        return canonical_bytes(signed)

    @classmethod
    def create(
        cls,
        identity: NodeIdentity,
        round_id: str,
        delta_bytes: bytes,
        num_samples: int,
        train_loss: float,
        now: datetime | None = None,
        steps: int | None = None,
        clip_bit: float | None = None,
    ) -> ParticipantSubmission:
        """Hash and sign a delta for a round: what a participant sends with the delta's bytes."""
        delta_sha = sha256_hex(delta_bytes)
        data = cls.signing_bytes(
            round_id, identity.node_id, delta_sha, num_samples, steps, clip_bit
        )
        return cls(
            round_id=round_id,
            participant=identity.node_id,
            delta_sha=delta_sha,
            num_samples=num_samples,
            train_loss=float(train_loss),
            submitted_at=format_ts(now or datetime.now(UTC)),
            signature=identity.sign(data).hex(),
            steps=steps,
            clip_bit=clip_bit,
        )

    def verify(self, delta_bytes: bytes | None = None) -> None:
        """`signature_invalid` unless the participant signed this; with bytes, check their SHA."""
        data = self.signing_bytes(
            self.round_id,
            self.participant,
            self.delta_sha,
            self.num_samples,
            self.steps,
            self.clip_bit,
        )
        if not verify(NodeID(self.participant), data, bytes.fromhex(self.signature)):
            raise HearthnetError(ErrorCode.SIGNATURE_INVALID, "submission signature is invalid")
        if delta_bytes is not None and sha256_hex(delta_bytes) != self.delta_sha:
            raise HearthnetError(
                ErrorCode.DELTA_INVALID, "delta bytes do not match the signed delta_sha"
            )


def capped_weights(num_samples: Sequence[int]) -> list[int]:
    """Each claim capped at FEDLEARN_MAX_NUM_SAMPLES and at FEDLEARN_WEIGHT_MEDIAN_CAP × the
    lower median claim: a participant inflating its count gains at most that factor."""
    if not num_samples or any(n < 1 for n in num_samples):
        raise HearthnetError(ErrorCode.FEDLEARN_AGGREGATION_FAILED, "num_samples must be >= 1")
    cap = min(
        C.FEDLEARN_MAX_NUM_SAMPLES,
        C.FEDLEARN_WEIGHT_MEDIAN_CAP * statistics.median_low(num_samples),
    )
    return [min(n, cap) for n in num_samples]
