"""The effects and timers a participant's machine asks its driver for (`drivers/participant.py`
carries them out); light, shared by the machine and its secure steps."""

from __future__ import annotations

from dataclasses import dataclass

from hearthnet.fedlearn.machines.effects import Aggregate, Append, Call, SetTimer
from hearthnet.fedlearn.masks import MaskingKey
from hearthnet.fedlearn.secagg import SecAggRound

ROSTER_TIMER = "roster"
UNMASK_TIMER = "unmask"


@dataclass(frozen=True)
class Train:
    """Train on the manifest's topic (in a thread) and feed the outcome to `trained`."""

    round_id: str


@dataclass(frozen=True)
class NewMaskKey:
    """Make a fresh X25519 masking key (randomness: the driver's) and feed it to `keyed`."""

    round_id: str


@dataclass(frozen=True)
class MakeShares:
    """Seal Shamir shares of the round secrets for each neighbour (randomness: the driver's)
    and feed the bundle to `shares_made`."""

    round_id: str
    plan: SecAggRound


@dataclass(frozen=True)
class Wait:
    """Wait for the coordinator's next event (`settled`), with no deadline of its own."""


@dataclass(frozen=True)
class Submit:
    """Read the trained delta; in a secure round mask it with `key` over `roster` and the
    share set `shared` (in a thread); store the bytes and feed them to `submission`."""

    round_id: str
    trained_sha: str
    key: MaskingKey | None
    plan: SecAggRound | None
    shared: list[str] | None = None


@dataclass(frozen=True)
class TrainOutcome:
    """What training produced (its delta already stored as blob `blob_sha`)."""

    blob_sha: str
    num_samples: int
    train_loss: float
    steps: int
    stopped_early: bool
    clip_bit: float | None = None  # adaptive clipping (clipping.py)


ParticipantEffect = (
    Append | Call | SetTimer | Aggregate | Train | NewMaskKey | MakeShares | Wait | Submit
)
