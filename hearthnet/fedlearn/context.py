"""What the round code needs from its node: identity, log, blobs, bus, peers, base model."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from hearthnet.blobs import BlobStore
from hearthnet.bus.bus import CapabilityBus
from hearthnet.config import NodeConfig
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import EventLog
from hearthnet.eventlog.security import SecurityEvents
from hearthnet.fedlearn.reputation import EVENT as REPUTATION_EVENT
from hearthnet.fedlearn.reputation import Observation, ReputationTable
from hearthnet.fedlearn.reputation import fold as fold_reputation
from hearthnet.identity import NodeIdentity
from hearthnet.llm.service import LLMService
from hearthnet.tasks import Spawner


@dataclass
class FedContext:
    """What every fedlearn part of a node shares: its identity, config, log, blobs, bus, model
    and transport, plus one change condition and the reputation table."""

    identity: NodeIdentity
    config: NodeConfig
    eventlog: EventLog
    blobs: BlobStore
    bus: CapabilityBus
    llm: LLMService
    transport: Any  # hearthnet.bus.transport.Transport (peers, subscribe, wait_for_peer)
    tasks: Spawner = field(default_factory=lambda: Spawner("fedlearn"))
    # One condition for every round state change on this node (coordinator and participant),
    # so a waiter (`status --wait`, the participant driver) needs only one.
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    reputation: ReputationTable = field(init=False)
    security: SecurityEvents = field(init=False)

    def __post_init__(self) -> None:
        fed = self.config.fedlearn
        self.reputation = ReputationTable(fed.reputation_decay, fed.reputation_ban_threshold)
        self.security = SecurityEvents(self.eventlog)

    async def load_reputation(self) -> None:
        """Rebuild the reputation table from this node's log."""
        events = await self.eventlog.read_all(REPUTATION_EVENT)
        table = self.reputation
        self.reputation = fold_reputation(
            (e.payload for e in events if e.actor == self.node_id),  # only our own findings
            table.decay,
            table.ban_below,
        )

    async def record_reputation(self, round_id: str, observed: list[Observation]) -> None:
        """Log one `fedlearn.reputation.updated` per participant of a round this node
        aggregated, then apply it (the log leads). A round is recorded once."""
        for body in self.reputation.changes(round_id, observed):
            await self.eventlog.append(REPUTATION_EVENT, body)
            self.reputation.apply(body)

    @property
    def node_id(self) -> str:
        """This node's ID."""
        return self.identity.node_id

    @property
    def roster(self) -> set[str]:
        """Coordinators whose manifests this node trusts: the trust roster and itself."""
        return {*self.config.trust.roster, self.identity.node_id}

    def connected(self, node: str) -> bool:
        """Whether `node` is this node or a peer with an open connection now."""
        if node == self.node_id:
            return True
        peer = self.transport.peers.get(node)
        return peer is not None and not peer.closed.is_set()

    def connected_peers(self) -> list[str]:
        """The IDs of peers connected now, sorted."""
        return sorted(n for n, p in self.transport.peers.items() if not p.closed.is_set())

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """A background task that is cancelled when the node stops and logs its failure."""
        return self.tasks.spawn(coro, name)

    def model_shapes(self) -> dict[str, tuple[int, int]]:
        """The base model's LoRA target shapes; `model_unavailable` until the model is prepared."""
        shapes = getattr(self.llm, "model_shapes", None)
        if shapes is None:
            raise HearthnetError(ErrorCode.MODEL_UNAVAILABLE, "the base model is not prepared")
        return dict(shapes)
