"""Background tasks: held until they end, failures logged with their name, all stopped at stop."""

import asyncio
import gc

from structlog.testing import capture_logs

from hearthnet.tasks import Spawner


async def test_a_failing_task_is_logged_with_its_name():
    spawner = Spawner("tester")

    async def boom() -> None:
        raise RuntimeError("it broke")

    with capture_logs() as logs:
        task = spawner.spawn(boom(), "boom-task")
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)  # done callbacks run on the next loop pass
    [entry] = [e for e in logs if e["event"] == "background task failed"]
    assert entry["task"] == "boom-task" and entry["owner"] == "tester"
    assert "it broke" in entry["error"] and entry["log_level"] == "error"
    assert len(spawner) == 0


async def test_tasks_are_held_and_stop_cancels_and_awaits_them():
    spawner = Spawner("tester")
    started, cancelled = asyncio.Event(), []

    async def forever(n: int) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # cleanup that must finish before stop returns
            cancelled.append(n)
            raise

    for n in range(3):
        spawner.spawn(forever(n), f"forever-{n}")
    gc.collect()  # held by the spawner, not only by asyncio's weak set
    await started.wait()
    assert len(spawner) == 3
    with capture_logs() as logs:
        await spawner.stop()
    assert sorted(cancelled) == [0, 1, 2] and len(spawner) == 0
    assert not [e for e in logs if e["event"] == "background task failed"]  # cancel is no failure


async def test_wait_lets_tasks_finish():
    spawner = Spawner("tester")
    done = []

    async def work() -> None:
        await asyncio.sleep(0.01)
        done.append(1)

    task = spawner.spawn(work(), "work")
    await spawner.wait()
    assert done == [1] and task.result() is None
