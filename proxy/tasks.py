"""Tracked background tasks: nothing is fired and forgotten.

Work that must finish even if the request that started it is cancelled (a hold, a
settlement: :mod:`proxy.lifecycle`) runs as a task kept here and is awaited through a
shield or ``asyncio.wait``; the lifespan waits for whatever is left at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

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
