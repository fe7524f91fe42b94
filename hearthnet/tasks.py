"""Background tasks that are neither lost nor silent.

asyncio keeps only a weak reference to a task, so a task nobody holds can vanish mid-run, and
an exception in a task nobody awaits is reported only when it is garbage-collected, if ever.
`Spawner` holds every task it starts until it ends, logs a failure with the task's name as it
happens, and cancels and awaits whatever is left at `stop`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from hearthnet.logs import get_logger

log = get_logger("hearthnet.tasks")

T = TypeVar("T")


class Spawner:
    """The background tasks of one owner (a transport, a peer session, a service)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        """The tasks running now (a snapshot: iterating does not see tasks start or end)."""
        return iter(list(self.tasks))

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run `coro` as a task named `name`, held until it ends; if it raises, the exception
        is logged with the owner and the name."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "background task failed",
                owner=self.owner,
                task=task.get_name(),
                error=f"{type(exc).__name__}: {exc}",
                exc_info=exc,
            )

    def cancel(self) -> None:
        """Ask every task to stop, without waiting."""
        for task in list(self.tasks):
            task.cancel()

    async def stop(self) -> None:
        """Cancel every task and wait until all have ended (their failures are logged, not
        raised here)."""
        self.cancel()
        await self.wait()

    async def wait(self) -> None:
        """Wait until every task started so far has ended, without cancelling them."""
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
