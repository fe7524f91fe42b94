"""The LLM service on the capability bus: `llm.generate`, `llm.perplexity`,
`llm.session.apply_adapter`, `llm.adapter.list`, and the operator-only `llm.adapter.set_default`.

Sessions and generation use this node's compute and belong to its operator, so they are
local-only (the control channel); which adapters a node has is public. Model work runs in
worker threads: the event loop never waits on a forward pass.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from hearthnet import constants as C
from hearthnet.bus.bus import CallContext, CapabilityBus
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.llm.service import LLMService

_SHA = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateRequest(_Req):
    """`llm.generate`: a prompt, in a session or with a one-off adapter."""

    prompt: Annotated[str, Field(min_length=1, max_length=C.LLM_MAX_PROMPT_CHARS)]
    max_new_tokens: Annotated[int, Field(ge=1, le=C.LLM_MAX_NEW_TOKENS)] = 64
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    session_id: str | None = None
    adapter_sha: _SHA | None = None  # for a one-off session when no session_id is given


class GenerateResponse(BaseModel):
    """The generated text and the session (and adapter) it ran in."""

    text: str
    session_id: str
    adapter_sha: str | None


class ApplyAdapterRequest(_Req):
    """`llm.session.apply_adapter`: switch a session (or a new one) to an adapter, or to none."""

    session_id: str | None = None  # none: open a new session
    sha: _SHA | None = None  # none: the base model without an adapter


class SessionResponse(BaseModel):
    """A session and the adapter it now uses."""

    session_id: str
    adapter_sha: str | None


class AdapterListResponse(BaseModel):
    """`llm.adapter.list`: the base model's identity and the adapters this node holds."""

    base_model_id: str
    base_model_sha: str
    node_default: str | None
    adapters: list[dict[str, Any]]


class SetDefaultRequest(_Req):
    """Operator only: the adapter new sessions start with (None: the base model)."""

    sha: _SHA | None = None


class PerplexityRequest(_Req):
    """Perplexity of texts under the base model or an adapter (the held-out check uses it)."""

    texts: Annotated[
        list[Annotated[str, Field(max_length=C.DATA_MAX_SAMPLE_CHARS)]],
        Field(min_length=1, max_length=C.LLM_EVAL_MAX_TEXTS),
    ]
    adapter_sha: _SHA | None = None  # none: the base model alone


class PerplexityResponse(BaseModel):
    """The perplexity measured and the adapter it was measured with."""

    perplexity: float
    adapter_sha: str | None


def register_llm(bus: CapabilityBus, service: LLMService) -> None:
    """Register the `llm.*` capabilities on `bus`, backed by `service`."""

    def session(session_id: str | None, adapter_sha: str | None = None) -> Any:
        if session_id is None:
            return service.open_session(adapter_sha)
        found = service.sessions.get(session_id)
        if found is None:
            raise HearthnetError(ErrorCode.BAD_REQUEST, f"no session {session_id[:32]}")
        return found

    async def generate(_ctx: CallContext, req: GenerateRequest) -> GenerateResponse:
        s = session(req.session_id, req.adapter_sha)
        text = await asyncio.to_thread(s.generate, req.prompt, req.max_new_tokens, req.temperature)
        return GenerateResponse(text=text, session_id=s.id, adapter_sha=s.adapter_sha)

    async def apply_adapter(_ctx: CallContext, req: ApplyAdapterRequest) -> SessionResponse:
        s = session(req.session_id)
        s.apply_adapter(req.sha)
        return SessionResponse(session_id=s.id, adapter_sha=s.adapter_sha)

    async def adapter_list(_ctx: CallContext, _req: _Req) -> AdapterListResponse:
        return AdapterListResponse(
            base_model_id=service.base_model_id,
            base_model_sha=service.base_model_sha,
            node_default=service.node_default,
            adapters=service.adapters(),
        )

    async def set_default(_ctx: CallContext, req: SetDefaultRequest) -> AdapterListResponse:
        service.set_node_adapter(req.sha)
        return await adapter_list(_ctx, _Req())

    async def perplexity(_ctx: CallContext, req: PerplexityRequest) -> PerplexityResponse:
        if req.adapter_sha is not None:
            service.require_adapter(req.adapter_sha)
        value = await asyncio.to_thread(service.perplexity, req.texts, req.adapter_sha)
        return PerplexityResponse(perplexity=value, adapter_sha=req.adapter_sha)

    bus.register(
        "llm.perplexity",
        perplexity,
        PerplexityRequest,
        PerplexityResponse,
        local_only=True,
        description="held-out perplexity of the base model, or with an adapter",
    )
    bus.register(
        "llm.generate",
        generate,
        GenerateRequest,
        GenerateResponse,
        local_only=True,
        description="generate with the node's model in a session",
    )
    bus.register(
        "llm.session.apply_adapter",
        apply_adapter,
        ApplyAdapterRequest,
        SessionResponse,
        local_only=True,
        description="select a session's adapter",
    )
    bus.register(
        "llm.adapter.list",
        adapter_list,
        _Req,
        AdapterListResponse,
        description="the base model and the adapters this node has",
    )
    bus.register(
        "llm.adapter.set_default",
        set_default,
        SetDefaultRequest,
        AdapterListResponse,
        local_only=True,
        description="operator: the adapter new sessions start with",
    )
