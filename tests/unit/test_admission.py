"""`Admission`: a limit, a bounded FIFO queue, and Overloaded (429) beyond it or after the
queue timeout; no path may leak or double a place."""

from __future__ import annotations

import asyncio

import pytest

from di_router.router.admission import Admission, Overloaded

pytestmark = pytest.mark.anyio


async def run_pending() -> None:
    """Let every runnable task take its next step (no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


def entering(admission: Admission, name: str, order: list[str]) -> asyncio.Task[None]:
    async def enter() -> None:
        await admission.enter()
        order.append(name)

    return asyncio.ensure_future(enter())


async def test_no_limit_never_waits() -> None:
    admission = Admission(0, 0, 1.0)
    for _ in range(100):
        await admission.enter()
    admission.leave()


async def test_places_are_handed_over_in_arrival_order() -> None:
    admission = Admission(2, 10, 10.0)
    await admission.enter()
    await admission.enter()
    order: list[str] = []
    tasks = [entering(admission, name, order) for name in "abcd"]
    await run_pending()
    assert order == []
    for expected in (["a"], ["a", "b"], ["a", "b", "c"]):
        admission.leave()
        await run_pending()
        assert order == expected
    # A newcomer does not overtake the one still waiting.
    late = entering(admission, "late", order)
    admission.leave()
    await run_pending()
    assert order == ["a", "b", "c", "d"]
    assert not late.done()
    admission.leave()
    await asyncio.wait_for(late, 1)
    await asyncio.gather(*tasks)


async def test_full_queue_is_overloaded_at_once() -> None:
    admission = Admission(1, 1, 10.0)
    await admission.enter()
    waiter = entering(admission, "w", [])
    await run_pending()
    with pytest.raises(Overloaded):
        await admission.enter()
    admission.leave()
    await asyncio.wait_for(waiter, 1)


async def test_queue_timeout_is_overloaded_and_frees_its_queue_place() -> None:
    admission = Admission(1, 1, 0.05)
    await admission.enter()
    with pytest.raises(Overloaded):
        await admission.enter()
    # The timed-out waiter left the queue: another may queue, and gets the place on leave.
    order: list[str] = []
    waiter = entering(admission, "next", order)
    await run_pending()
    admission.leave()
    await asyncio.wait_for(waiter, 1)
    assert order == ["next"]


async def _assert_exactly_one_free_place(admission: Admission) -> None:
    await asyncio.wait_for(admission.enter(), 1)
    blocked = entering(admission, "over", [])
    await run_pending()
    assert not blocked.done(), "a place leaked: more than the limit admitted"
    blocked.cancel()
    await asyncio.gather(blocked, return_exceptions=True)


async def test_cancelled_waiter_leaks_no_place() -> None:
    admission = Admission(1, 5, 10.0)
    await admission.enter()
    waiter = entering(admission, "w", [])
    await run_pending()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    admission.leave()
    await _assert_exactly_one_free_place(admission)


async def test_waiter_cancelled_as_its_place_arrives_passes_it_on() -> None:
    """`leave` hands the place over, and the waiter is cancelled before it runs again."""
    admission = Admission(1, 5, 10.0)
    await admission.enter()
    order: list[str] = []
    cancelled = entering(admission, "cancelled", order)
    await run_pending()
    admission.leave()
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert order == []
    await _assert_exactly_one_free_place(admission)


async def test_place_handed_over_to_the_next_waiter_when_one_is_cancelled_first() -> None:
    admission = Admission(1, 5, 10.0)
    await admission.enter()
    order: list[str] = []
    first = entering(admission, "first", order)
    second = entering(admission, "second", order)
    await run_pending()
    admission.leave()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert order == ["second"]
