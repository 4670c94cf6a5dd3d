"""A client's departure while its request awaits the provider: the awaited work is
cancelled in the request's own task, and the task's cancellation count is as before."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.relay import unless_client_leaves
from proxy.server import DEPARTURE, Departure


class Flow:
    def resume_reading(self) -> None:
        pass


class Request:
    def __init__(self, departure: Departure):
        self.scope: dict[str, Any] = {"extensions": {DEPARTURE: departure}}


async def test_a_departure_cancels_what_is_awaited_and_leaves_no_cancellation() -> None:
    departure = Departure(Flow())
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def provider() -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "answer"

    async def request() -> tuple[str | None, int]:
        got = await unless_client_leaves(Request(departure), provider())  # type: ignore[arg-type]
        await asyncio.sleep(0.01)  # the task goes on: no cancellation is left pending
        task = asyncio.current_task()
        assert task is not None
        return got, task.cancelling()

    task = asyncio.get_running_loop().create_task(request())
    await started.wait()
    departure.leave()
    assert await asyncio.wait_for(task, 5) == (None, 0)
    assert cancelled.is_set()


async def test_an_answer_before_any_departure_is_returned() -> None:
    departure = Departure(Flow())

    async def provider() -> str:
        await asyncio.sleep(0)
        return "answer"

    assert await unless_client_leaves(Request(departure), provider()) == "answer"  # type: ignore[arg-type]
    departure.leave()  # too late to matter: no watcher is left
    await asyncio.sleep(0.01)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


@pytest.mark.parametrize("also_departs", [False, True])
async def test_a_cancellation_from_elsewhere_is_raised_as_it_came(also_departs: bool) -> None:
    departure = Departure(Flow())
    started = asyncio.Event()

    async def provider() -> str:
        started.set()
        await asyncio.sleep(30)
        return "answer"

    task = asyncio.get_running_loop().create_task(
        unless_client_leaves(Request(departure), provider()))  # type: ignore[arg-type]
    await started.wait()
    task.cancel()  # the server gives up on the request
    if also_departs:
        departure.leave()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_client_gone_already_is_not_waited_for() -> None:
    departure = Departure(Flow())
    departure.leave()
    ran = []

    async def provider() -> str:
        ran.append(1)
        return "answer"

    assert await unless_client_leaves(Request(departure), provider()) is None  # type: ignore[arg-type]
    assert ran == []
