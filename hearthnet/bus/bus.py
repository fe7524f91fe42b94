"""CapabilityBus: named async capabilities with pydantic request/response models.

A capability is called locally (`peer=None`) or on a peer over the transport. Handlers receive a
`CallContext` whose `caller` is the authenticated NodeID of the session — never anything from the
payload. Namespaces behind feature flags answer `experimental_disabled` for every name under them
while the flag is off, read-only queries included, and in both directions.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError, first_problem
from hearthnet.fairshare import FairShare
from hearthnet.identity import NodeID
from hearthnet.logs import get_logger

log = get_logger("hearthnet.bus")

# flag name in NodeConfig.features -> the namespace it gates
FEATURE_NAMESPACES = {C.FEDLEARN_FEATURE: C.FEDLEARN_CAP_PREFIX}
_NAME_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")


@dataclass
class CallContext:
    """Who is calling a handler: the session's authenticated NodeID (never a payload field), whether
    the call is local, and the blob that came with it."""

    caller: NodeID
    local: bool
    blob: bytes | None = None


HandlerResult = BaseModel | tuple[BaseModel, bytes | None]
Handler = Callable[[CallContext, Any], Awaitable[HandlerResult]]


@dataclass(frozen=True)
class Capability:
    """One registered capability: its handler and the models that validate what goes in and out."""

    name: str
    handler: Handler
    request_model: type[BaseModel]
    response_model: type[BaseModel]
    local_only: bool = False
    description: str = ""


class RemoteCaller(Protocol):
    """What the bus needs from a transport to reach a peer; `Transport` implements it."""

    async def call_remote(
        self, peer: str, name: str, body: dict[str, Any], timeout: float, blob: bytes | None
    ) -> tuple[dict[str, Any], bytes | None]:
        """Run capability `name` on `peer` and return its raw response body and blob."""


def _inflight_share() -> FairShare:
    return FairShare(
        C.MAX_INFLIGHT_PER_PEER,
        C.INFLIGHT_GUARANTEED_PER_PEER,
        C.FAIR_SHARE_RESERVED_PEERS,
        C.INFLIGHT_SHARED,
    )


@dataclass
class CapabilityBus:
    """The node's table of named capabilities, called locally or by peers through one path.

    Every call, from the control socket, a module or a peer, goes through `dispatch`, so
    validation, feature gates and error wrapping are the same for all of them."""

    node_id: NodeID
    features: Mapping[str, bool] = field(default_factory=dict)
    remote: RemoteCaller | None = None
    # Requests served for peers at once, shared fairly by every connection (peer.py).
    remote_calls: FairShare = field(default_factory=_inflight_share)
    _caps: dict[str, Capability] = field(default_factory=dict)
    _missing: dict[str, HearthnetError] = field(default_factory=dict)

    def disabled_namespace(self, name: str) -> str | None:
        """The gated namespace `name` falls under while its feature flag is off, else None."""
        for flag, prefix in FEATURE_NAMESPACES.items():
            if name.startswith(prefix) and not self.features.get(flag, False):
                return prefix
        return None

    def _gate(self, name: str) -> None:
        prefix = self.disabled_namespace(name)
        if prefix is not None:
            flag = next(f for f, p in FEATURE_NAMESPACES.items() if p == prefix)
            section, key = flag.split(".", 1)
            raise HearthnetError(
                ErrorCode.EXPERIMENTAL_DISABLED,
                f"{prefix}* is disabled on this node: set [{section}] {key} = true in its "
                "config and restart it",
            )

    def explain_missing(self, prefix: str, error: HearthnetError) -> None:
        """Answer `error` instead of `unknown_capability` for names under `prefix` that are not
        registered: a module this node has switched off, with how to switch it on."""
        self._missing[prefix] = error

    def register(
        self,
        name: str,
        handler: Handler,
        request_model: type[BaseModel],
        response_model: type[BaseModel],
        *,
        local_only: bool = False,
        description: str = "",
    ) -> None:
        """Add a capability; a gated one is refused while its flag is off, so none can reach it."""
        if len(name) > C.CAPABILITY_NAME_MAX_LEN or not _NAME_RE.match(name):
            raise ValueError(f"invalid capability name {name!r}")
        if name in self._caps:
            raise ValueError(f"capability {name} is already registered")
        self._gate(name)  # a gated capability does not exist while its flag is off
        self._caps[name] = Capability(
            name, handler, request_model, response_model, local_only, description
        )

    def describe(self) -> list[dict[str, Any]]:
        """Every capability with its JSON schemas, for operators and tools discovering the node."""
        return [
            {
                "name": cap.name,
                "description": cap.description,
                "local_only": cap.local_only,
                "request": cap.request_model.model_json_schema(),
                "response": cap.response_model.model_json_schema(),
            }
            for cap in sorted(self._caps.values(), key=lambda c: c.name)
        ]

    async def dispatch(
        self, name: str, body: dict[str, Any], ctx: CallContext
    ) -> tuple[dict[str, Any], bytes | None]:
        """Run a capability for a caller (local or an authenticated peer)."""
        self._gate(name)
        cap = self._caps.get(name)
        if cap is None:
            for prefix, why in self._missing.items():
                if name.startswith(prefix):
                    raise HearthnetError(why.code, why.message)
        if cap is None or (cap.local_only and not ctx.local):
            raise HearthnetError(ErrorCode.UNKNOWN_CAPABILITY, f"no capability {name!r}")
        try:
            request = cap.request_model.model_validate(body)
        except ValidationError as exc:
            where, reason = first_problem(exc, "body")
            raise HearthnetError(
                ErrorCode.BAD_REQUEST, f"{name}: field '{where}': {reason}"
            ) from None
        try:
            result = await cap.handler(ctx, request)
        except HearthnetError:
            raise
        except Exception as exc:  # a handler bug must not leak internals or kill the session
            log.exception("capability failed", capability=name, caller=ctx.caller)
            raise HearthnetError(ErrorCode.INTERNAL_ERROR, f"{name} failed") from exc
        model, blob = result if isinstance(result, tuple) else (result, None)
        return model.model_dump(mode="json"), blob

    async def call_blob(
        self,
        name: str,
        request: BaseModel | Mapping[str, Any] | None = None,
        *,
        peer: str | None = None,
        timeout: float = C.CALL_TIMEOUT_DEFAULT_S,
        blob: bytes | None = None,
        response_model: type[BaseModel] | None = None,
    ) -> tuple[Any, bytes | None]:
        """Call `name` and return (response, blob). The response is `response_model` (or the
        locally registered one) when known, else the raw dict."""
        self._gate(name)
        timeout = min(max(timeout, 0.001), C.CALL_TIMEOUT_MAX_S)
        if isinstance(request, BaseModel):
            body = request.model_dump(mode="json")
        else:
            body = dict(request or {})
        if peer is None or peer == self.node_id:
            ctx = CallContext(caller=self.node_id, local=True, blob=blob)
            try:
                async with asyncio.timeout(timeout):
                    raw, out_blob = await self.dispatch(name, body, ctx)
            except TimeoutError:
                raise HearthnetError(
                    ErrorCode.TIMEOUT, f"{name} timed out after {timeout}s"
                ) from None
        else:
            if self.remote is None:
                raise HearthnetError(ErrorCode.PEER_NOT_CONNECTED, f"peer {peer} is not connected")
            raw, out_blob = await self.remote.call_remote(peer, name, body, timeout, blob)
        model = response_model or (self._caps[name].response_model if name in self._caps else None)
        if model is None:
            return raw, out_blob
        try:
            return model.model_validate(raw), out_blob
        except ValidationError:
            raise HearthnetError(
                ErrorCode.PROTOCOL_ERROR, f"{name}: malformed response from {peer or 'local'}"
            ) from None

    async def call(
        self,
        name: str,
        request: BaseModel | Mapping[str, Any] | None = None,
        *,
        peer: str | None = None,
        timeout: float = C.CALL_TIMEOUT_DEFAULT_S,
        blob: bytes | None = None,
        response_model: type[BaseModel] | None = None,
    ) -> Any:
        """Call `name` and return its response alone (see `call_blob` for one with a blob)."""
        response, _ = await self.call_blob(
            name, request, peer=peer, timeout=timeout, blob=blob, response_model=response_model
        )
        return response
