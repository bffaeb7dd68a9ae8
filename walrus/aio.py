"""Async helpers every layer may use: run coroutines together, failing as one."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable


async def gather_all(coros) -> list:
    """Run all concurrently; on the first failure cancel the others, wait for them, re-raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class TaskWindow:
    """Coroutines started in order, at most `size` running at once (start() waits for a slot).

    The first failure surfaces at the next start() and at results(); cancel() stops every one still
    running and waits for them. Used where a producer feeds requests as it goes: the parts of an
    upload, the delete batches of a listing."""

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)
        self._tasks: list[asyncio.Task] = []
        self._failure: BaseException | None = None

    def __len__(self) -> int:
        return len(self._tasks)

    async def start(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """fn(*args) in a task of its own, once a slot is free."""
        self._raise_failure()
        await self._slots.acquire()
        try:
            self._raise_failure()
        except BaseException:
            self._slots.release()
            raise
        task = asyncio.ensure_future(self._run(fn, args))
        task.add_done_callback(self._note)
        self._tasks.append(task)

    async def _run(self, fn: Callable[..., Awaitable[Any]], args: tuple) -> Any:
        try:
            return await fn(*args)
        finally:
            self._slots.release()

    def _note(self, task: asyncio.Task) -> None:
        if self._failure is None and not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def results(self) -> list:
        """Every result, in start order (a failure cancels the rest and is raised)."""
        return await gather_all(self._tasks)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
