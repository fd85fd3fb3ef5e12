"""The state backend's algorithms, on a controlled clock."""

import math

import pytest

from imgproxy.state import MemoryState, RateLimit, Reservation


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def state(clock):
    return MemoryState(clock)


async def test_gcra_allows_a_burst_then_refills_evenly(state, clock):
    limit = RateLimit("k", limit=3, period=60)
    decisions = [(await state.rate_limit([limit]))[0] for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, True]
    assert [d.remaining for d in decisions] == [2, 1, 0]
    refused = (await state.rate_limit([limit]))[0]
    assert not refused.allowed and refused.retry_after == pytest.approx(20)
    assert refused.reset_after == pytest.approx(60)
    clock.now += 20
    assert (await state.rate_limit([limit]))[0].allowed
    assert not (await state.rate_limit([limit]))[0].allowed


async def test_several_limits_are_charged_all_or_nothing(state, clock):
    requests = RateLimit("req", limit=10, period=60)
    images = RateLimit("img", limit=4, period=60, cost=3)
    first = await state.rate_limit([requests, images])
    assert [d.allowed for d in first] == [True, True] and [d.remaining for d in first] == [9, 1]
    second = await state.rate_limit([requests, images])
    assert [d.allowed for d in second] == [True, False]
    assert second[0].remaining == 9  # the refused request did not use a request
    assert second[1].retry_after == pytest.approx(30)


async def test_a_cost_above_the_limit_can_never_pass(state):
    decision = (await state.rate_limit([RateLimit("img", limit=2, period=60, cost=3)]))[0]
    assert not decision.allowed and decision.retry_after == math.inf


async def test_reserve_all_or_nothing_and_expiry(state, clock):
    day = Reservation("day", 4.0, limit=10.0, ttl=100)
    minute = Reservation("minute", 4.0, limit=5.0, ttl=60)
    assert await state.reserve([day, minute]) is None
    assert await state.reserve([day, minute]) == 1
    assert await state.get("day") == 4.0  # the failed reservation changed nothing
    assert await state.add("day", -1.5, ttl=100) == 2.5
    clock.now += 61
    assert await state.get("minute") == 0.0
    assert await state.reserve([day, minute]) is None
    clock.now += 40
    assert await state.get("day") == 0.0


async def test_set_and_expiry(state, clock):
    await state.set("cooldown", 1, ttl=10)
    assert await state.get("cooldown") == 1
    clock.now += 10
    assert await state.get("cooldown") == 0
