"""Shared runs (proxy.tasks.Shared): one run a key for the calls made while it runs."""

from __future__ import annotations

import asyncio
import functools

import pytest

from proxy.tasks import Shared


async def test_calls_made_while_a_run_is_on_share_it_and_later_ones_run_again() -> None:
    runs: list[str] = []

    async def read(key: str) -> str:
        runs.append(key)
        await asyncio.sleep(0.01)
        return key.upper()

    shared: Shared[str] = Shared()
    got = await asyncio.gather(*(shared.run(k, functools.partial(read, k)) for k in "aaab"))
    assert got == ["A", "A", "A", "B"]
    assert runs == ["a", "b"]
    assert await shared.run("a", lambda: read("a")) == "A"
    assert runs == ["a", "b", "a"]


async def test_closing_cancels_every_run_forgotten_or_not_and_can_itself_be_cancelled(
        ) -> None:
    shared: Shared[None] = Shared()
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    loop = asyncio.get_running_loop()
    waiting = [loop.create_task(shared.run(k, forever)) for k in ("kept", "forgotten")]
    await started.wait()
    shared.forget("forgotten")
    await asyncio.wait_for(shared.aclose(), 5)
    for w in waiting:
        with pytest.raises(asyncio.CancelledError):
            await w

    stubborn_started, let_go = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        stubborn_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await let_go.wait()  # ends only once let go

    other: Shared[None] = Shared()
    holder = loop.create_task(other.run("k", stubborn))
    await stubborn_started.wait()
    closing = loop.create_task(other.aclose())
    await asyncio.sleep(0.01)
    closing.cancel()  # a shutdown that gives up waiting
    with pytest.raises(asyncio.CancelledError):
        await closing
    let_go.set()
    await holder  # the run ended normally once let go
