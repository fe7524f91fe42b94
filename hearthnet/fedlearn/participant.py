"""The participant role of a node: the participant driver (`drivers/participant.py`, running
`machines/participant.py`) plus coordinator takeover (`drivers/taker.py`, running
`machines/taker.py`). `capabilities.py` talks to this class only.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from hearthnet import constants as C
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.data import TrainingDataProvider
from hearthnet.fedlearn.drivers.coordinator import RoundCoordinator
from hearthnet.fedlearn.drivers.participant import ParticipantDriver
from hearthnet.fedlearn.drivers.taker import TakeoverDriver
from hearthnet.fedlearn.protocol import HandoverResponse, RoundResult, SignedDoc
from hearthnet.fedlearn.state import Membership

CAP = C.FEDLEARN_CAP_PREFIX


class RoundParticipant(ParticipantDriver):
    """The participant driver with the takeover watch beside each round it drives."""

    def __init__(
        self, ctx: FedContext, coordinator: RoundCoordinator, provider: TrainingDataProvider
    ):
        super().__init__(ctx, coordinator, provider)
        self.taker = TakeoverDriver(ctx, self)

    def _companions(self, member: Membership) -> dict[str, Coroutine[Any, Any, None]]:
        return {
            **super()._companions(member),
            f"takeover-{member.round_id}": self.taker.watch(member),
        }

    def _takeover_turn(self, member: Membership, claimed: RoundResult) -> bool:
        return self.taker.takeover_turn(member, claimed)

    async def takeover(self, round_id: str) -> SignedDoc:
        """Finalize a round whose coordinator is gone, as this node (`drivers/taker.py`)."""
        return await self.taker.takeover(round_id)

    async def handover(
        self, caller: str, round_id: str, receipt: SignedDoc
    ) -> tuple[HandoverResponse, bytes]:
        """This node's own submission, for the member taking the round over."""
        return await self.taker.handover(caller, round_id, receipt)
