"""Tracked background tasks: nothing is fired and forgotten.

Work that must finish even if the request that started it is cancelled (a hold, a
settlement: :mod:`proxy.lifecycle`) runs as a task kept here and is awaited through a
shield or ``asyncio.wait``; the lifespan waits for whatever is left at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class Shared(Generic[T]):
    """Calls for one key made while one is running share it: the first starts it (in a
    task of its own, so that a caller cancelled leaves it to the others), the others
    wait for its result or its error. A burst of requests for a user not yet known is
    then one read or one write, not one each."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[T]] = {}  # the run shared, by key
        self._tasks: set[asyncio.Task[T]] = set()  # every run not ended, forgotten or not

    async def run(self, key: Hashable, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return await asyncio.shield(self.start(key, make))

    def start(self, key: Hashable, make: Callable[[], Coroutine[Any, Any, T]]
              ) -> asyncio.Task[T]:
        """The run shared for ``key``, started with ``make()`` if none is running (for a
        caller that does not wait: a read ahead of need)."""
        task = self._running.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(make())
            self._running[key] = task
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._ended(key, t))
        return task

    def running(self, key: Hashable) -> bool:
        return key in self._running

    def _ended(self, key: Hashable, task: asyncio.Task[T]) -> None:
        self._tasks.discard(task)
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # its error is its callers', if any are left

    def current(self, key: Hashable) -> bool:
        """Whether the task running is the one shared for ``key`` (not forgotten)."""
        return self._running.get(key) is asyncio.current_task()

    def forget(self, key: Hashable) -> None:
        """Calls for ``key`` from now on start a run of their own."""
        self._running.pop(key, None)

    async def aclose(self) -> None:
        """Cancel the runs and wait for them to end (at shutdown)."""
        while tasks := list(self._tasks):
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)

