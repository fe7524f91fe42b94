"""Following a coordinator's round events: the I/O behind `ParticipantMachine.observe`.

A subscription to the coordinator's `fedlearn.round.*` events (or this node's own log, when it
coordinates the round itself), resumed after the last event seen whenever it breaks, until the
round ends here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hearthnet import constants as C
from hearthnet.eventlog import Event
from hearthnet.fedlearn.context import FedContext
from hearthnet.fedlearn.events import ROUND_PREFIX
from hearthnet.fedlearn.state import TERMINAL_STAGES, Membership
from hearthnet.logs import get_logger

log = get_logger("hearthnet.fedlearn.participant")

_RETRY_S = 1.0

Observe = Callable[[Event], Awaitable[None]]


async def follow(ctx: FedContext, member: Membership, observe: Observe) -> None:
    """Feed the coordinator's round events to `observe` until the round ends here. A bad event
    or a lost peer pauses following; it resumes from `member.seen_seq`."""
    coordinator = member.signed.manifest.coordinator
    while member.stage not in TERMINAL_STAGES:
        try:
            if coordinator == ctx.node_id:
                await _follow_local(ctx, member, observe)
            else:
                await ctx.transport.wait_for_peer(coordinator, C.FEDLEARN_PEER_CALL_TIMEOUT_S)
                sub = await ctx.transport.subscribe(coordinator, ROUND_PREFIX, member.seen_seq)
                try:
                    async for event in sub:
                        await observe(event)
                        if member.stage in TERMINAL_STAGES:
                            break
                finally:
                    await sub.close()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bad event or a lost peer: pause, resubscribe
            log.info("following paused", round_id=member.round_id, reason=str(err)[:200])
        await asyncio.sleep(_RETRY_S)


async def _follow_local(ctx: FedContext, member: Membership, observe: Observe) -> None:
    sub = ctx.eventlog.subscribe(ROUND_PREFIX)
    try:
        for event in await ctx.eventlog.read_all(ROUND_PREFIX):
            await observe(event)
        async for event in sub:
            await observe(event)
            if member.stage in TERMINAL_STAGES:
                return
    finally:
        sub.close()
