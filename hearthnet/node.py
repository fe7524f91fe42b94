"""Node: wires identity, event log, blob store, capability bus, transport and control channel.

Built-in capabilities: `node.info` and `node.ping` for anyone connected, `node.status` for the
operator only (local calls through the control channel). Modules add capabilities to `bus` and
event-visibility rules with `allow_events`; by default a peer sees only `node.*` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from hearthnet import __version__
from hearthnet import constants as C
from hearthnet.blobs import BlobStore
from hearthnet.bus.bus import CallContext, CapabilityBus
from hearthnet.bus.peer import RemoteSubscription
from hearthnet.bus.transport import Transport, check_listen
from hearthnet.config import NodeConfig
from hearthnet.control import ControlServer
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import Event, EventLog
from hearthnet.identity import NodeID, NodeIdentity
from hearthnet.llm.capabilities import register_llm
from hearthnet.llm.service import LLMService
from hearthnet.logs import configure_logging, get_logger

if TYPE_CHECKING:  # imported when the flag is on: the module pulls in the trainer's stack
    from hearthnet.fedlearn.capabilities import FedLearnService
    from hearthnet.fedlearn.data import TrainingDataProvider

log = get_logger("hearthnet.node")

EventRule = Callable[[NodeID, Event], bool]


class Empty(BaseModel):
    """A request with no fields (extra ones refused)."""

    model_config = ConfigDict(extra="forbid")


class NodeInfo(BaseModel):
    """`node.info`: who this node is and which features it runs."""

    node_id: str
    name: str
    version: str
    network_id: str
    features: dict[str, bool]


class Ping(BaseModel):
    """`node.ping`: an optional nonce, echoed back."""

    model_config = ConfigDict(extra="forbid")
    nonce: str = ""


class Pong(BaseModel):
    """The echoed nonce, the responder's NodeID and its clock."""

    nonce: str
    node_id: str
    time: float


class NodeStatus(BaseModel):
    """`node.status` (operator only): listen address, peers, counters and the log's head."""

    node_id: str
    name: str
    listen: str
    peers: list[dict[str, Any]]
    features: dict[str, bool]
    counters: dict[str, int]
    event_head: int
    uptime_s: float


class Node:
    """One hearthnet node: owns the identity, event log, blob store, bus, transport, control socket
    and the optional model and fedlearn service, and starts and stops them in order."""

    def __init__(
        self,
        config: NodeConfig,
        identity: NodeIdentity | None = None,
        training_provider: TrainingDataProvider | None = None,
    ):
        self.config = config
        self.training_provider = training_provider
        self.identity = identity or NodeIdentity.load(config.key_path)
        self.node_id = self.identity.node_id
        self.bus = CapabilityBus(self.node_id, config.features)
        self._rules: list[tuple[str, EventRule]] = [("node.", lambda _peer, _event: True)]
        self.eventlog: EventLog | None = None
        self.blobs: BlobStore | None = None
        self.transport: Transport | None = None
        self.llm: LLMService | None = None
        self.fedlearn: FedLearnService | None = None  # when [experimental] fedlearn is on
        self._control: ControlServer | None = None
        self._started = 0.0
        self._running = False  # between "node started" and "node stopped"
        self._register_builtins()
        if not config.llm.enabled:  # say how to turn it on, not `unknown_capability`
            self.bus.explain_missing(
                "llm.",
                HearthnetError(
                    ErrorCode.MODEL_UNAVAILABLE,
                    "the language model is off on this node: set [llm] enabled = true in its "
                    "config and restart it",
                ),
            )

    # --- event visibility ---------------------------------------------------------------------

    def allow_events(self, prefix: str, rule: EventRule) -> None:
        """Let a peer see events under `prefix` when `rule(peer, event)` says so."""
        self._rules.append((prefix, rule))

    def _policy(self, peer: NodeID, event: Event) -> bool:
        return any(event.type.startswith(p) and rule(peer, event) for p, rule in self._rules)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open everything and start listening; on any failure what was opened is closed again."""
        await check_listen(self.config.listen.host, self.config.listen.port)
        data = self.config.data_dir
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        private_dir(data)  # an existing directory keeps no group/other access either
        self.eventlog = EventLog(data / C.EVENTLOG_FILE_NAME, self.identity)
        try:
            self.blobs = BlobStore(data / C.BLOBS_DIR_NAME)
            if self.config.llm.enabled and self.llm is None:
                self.llm = LLMService(self.config.llm, data)
                await asyncio.to_thread(self.llm.load)
                register_llm(self.bus, self.llm)
            if self.config.experimental.fedlearn and self.llm is None:
                # A coordinator needs the base model's identity and shapes, not its weights.
                self.llm = LLMService(self.config.llm, data)
                await asyncio.to_thread(self.llm.prepare)
            self.transport = Transport(
                self.identity, self.config, self.bus, self.eventlog, self._policy
            )
            if self.config.experimental.fedlearn:
                self._start_fedlearn()
            await self.transport.start()
            if self.fedlearn is not None:
                await self.fedlearn.start()
            self._control = ControlServer(data / C.CONTROL_SOCKET_NAME, self.bus)
            await self._control.start()
        except BaseException:
            await self.stop()
            raise
        self._started = time.monotonic()
        self._running = True
        host, port = self.transport.listen_address
        await self.eventlog.append("node.started", {"listen": f"{host}:{port}"})
        log.info(
            "node started",
            node_id=self.node_id,
            name=self.config.node.name,
            listen=f"wss://{host}:{port}",
            features=self.config.features,
        )

    def _start_fedlearn(self) -> None:
        from hearthnet.fedlearn.capabilities import FedLearnService
        from hearthnet.fedlearn.context import FedContext

        assert self.eventlog is not None and self.blobs is not None and self.llm is not None
        if self.fedlearn is None:
            ctx = FedContext(
                self.identity,
                self.config,
                self.eventlog,
                self.blobs,
                self.bus,
                self.llm,
                self.transport,
            )
            self.fedlearn = FedLearnService(ctx, self.training_provider)
            self.fedlearn.register(self.bus)
            self.allow_events("fedlearn.round.", self.fedlearn.event_visible)
        else:  # restarted in-process: fresh log, blobs and transport
            ctx = self.fedlearn.ctx
            ctx.eventlog, ctx.blobs, ctx.transport = self.eventlog, self.blobs, self.transport
        assert self.transport is not None
        self.transport.on_peer(self.fedlearn.peer_connected)

    async def stop(self) -> None:
        """Stop in reverse order of start and record `node.stopped`; safe after a failed start."""
        if self.fedlearn is not None:
            await self.fedlearn.stop()
        if self._control is not None:
            await self._control.stop()
            self._control = None
        if self.transport is not None:
            await self.transport.stop()
            self.transport = None
        if self.eventlog is not None:
            if self._running:
                with contextlib.suppress(Exception):
                    await self.eventlog.append("node.stopped", {})
            await self.eventlog.close()
            self.eventlog = None
        if self._running:  # a start that failed logs nothing here: the error says why
            self._running = False
            log.info("node stopped", node_id=self.node_id)

    async def run_until_signal(self) -> None:
        """Run in the foreground until SIGINT or SIGTERM, then shut down cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()

    # --- peers --------------------------------------------------------------------------------

    @property
    def listen_url(self) -> str:
        """The `wss://` URL peers dial to reach this node."""
        assert self.transport is not None
        host, port = self.transport.listen_address
        return f"wss://{host}:{port}"

    async def wait_for_peer(self, node: str, timeout: float = 10.0) -> None:
        """Wait until a session with `node` is up."""
        assert self.transport is not None
        await self.transport.wait_for_peer(node, timeout)

    async def subscribe_remote(
        self, peer: str, prefix: str, after_seq: int | None = None
    ) -> RemoteSubscription:
        """Follow a connected peer's events under `prefix`."""
        assert self.transport is not None
        return await self.transport.subscribe(peer, prefix, after_seq)

    # --- built-in capabilities ----------------------------------------------------------------

    def _register_builtins(self) -> None:
        self.bus.register(
            "node.info",
            self._info,
            Empty,
            NodeInfo,
            description="who this node is and what it runs",
        )
        self.bus.register("node.ping", self._ping, Ping, Pong, description="liveness")
        self.bus.register(
            "node.status",
            self._status,
            Empty,
            NodeStatus,
            local_only=True,
            description="operator view: peers, counters, features",
        )

    async def _info(self, _ctx: CallContext, _req: Empty) -> NodeInfo:
        return NodeInfo(
            node_id=self.node_id,
            name=self.config.node.name,
            version=__version__,
            network_id=self.config.node.network_id,
            features=self.config.features,
        )

    async def _ping(self, _ctx: CallContext, req: Ping) -> Pong:
        return Pong(nonce=req.nonce[:64], node_id=self.node_id, time=time.time())

    def _security_counts(self) -> dict[str, int]:
        """Every security event seen, written or folded into a summary (eventlog/security.py)."""
        return dict(self.fedlearn.ctx.security.total) if self.fedlearn is not None else {}

    async def _status(self, _ctx: CallContext, _req: Empty) -> NodeStatus:
        assert self.transport is not None and self.eventlog is not None
        return NodeStatus(
            node_id=self.node_id,
            name=self.config.node.name,
            listen=self.listen_url,
            peers=self.transport.peer_info(),
            features=self.config.features,
            counters={**self.transport.stats, **self._security_counts(), **self.eventlog.stats},
            event_head=self.eventlog.head_seq,
            uptime_s=round(time.monotonic() - self._started, 3),
        )


def private_dir(path: Path) -> None:
    """Make `path` 0700 (keys, event log, private text and adapters live under it), saying so
    when that removes access someone had."""
    mode = path.stat().st_mode & 0o777
    if mode != 0o700:
        os.chmod(path, 0o700)
        log.warning("data directory made private", path=str(path), was=oct(mode))


def run_node(config: NodeConfig) -> int:
    """`hearthnet node start`: configure logging and run the node until a signal."""
    configure_logging(config.log.format, config.log.level)
    asyncio.run(Node(config).run_until_signal())
    return 0
