"""The state backend's algorithms, on a controlled clock: the same cases against the memory
backend and against Redis (a real redis-server; the scripts take the test's clock)."""

import math
import os

import pytest

from imgproxy.redis_state import RedisState
from imgproxy.state import MemoryState, Pending, RateLimit, Reservation


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture(params=["memory", "redis"])
async def state(request, clock):
    if request.param == "memory":
        yield MemoryState(clock)
        return
    server = request.getfixturevalue("redis_server")
    backend = RedisState(server.url, key_prefix=f"test-{os.urandom(4).hex()}:", clock=clock)
    yield backend
    await backend.close()


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
    requests = RateLimit("{k}:req", limit=10, period=60)
    images = RateLimit("{k}:img", limit=4, period=60, cost=3)
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
    day = Reservation("{k}:day", 4.0, limit=10.0, ttl=100)
    minute = Reservation("{k}:minute", 4.0, limit=5.0, ttl=60)
    assert await state.reserve([day, minute]) is None
    assert await state.reserve([day, minute]) == 1
    assert await state.get("{k}:day") == 4.0  # the failed reservation changed nothing
    assert await state.add("{k}:day", -1.5, ttl=100) == 2.5
    clock.now += 61
    assert await state.get("{k}:minute") == 0.0
    assert await state.reserve([day, minute]) is None
    clock.now += 40
    assert await state.get("{k}:day") == 0.0


async def test_set_and_expiry(state, clock):
    await state.set("cooldown", 1, ttl=10)
    assert await state.get("cooldown") == 1
    clock.now += 10
    assert await state.get("cooldown") == 0


async def test_a_pending_record_is_settled_once_or_claimed_once(state, clock):
    spend = Reservation("spend:{team}:day", 2.0, limit=10.0, ttl=1000)
    first, second = (Pending("team", f"id-{i}", {"request_id": f"r{i}", "cost_usd": 2.0}, deadline=30) for i in (1, 2))
    assert await state.reserve([spend], first) is None
    assert await state.reserve([spend], second) is None
    assert await state.claim_expired() == []  # not yet past the deadline
    assert first.stored and second.stored
    assert await state.settle([Reservation("spend:{team}:day", -1.5, None, 1000)], first) == "settled"
    assert await state.get("spend:{team}:day") == 2.5
    clock.now += 31
    assert await state.claim_expired() == [{"request_id": "r2", "cost_usd": 2.0}]
    assert await state.claim_expired() == []  # each record goes to one claimer only
    # Settling a claimed record changes nothing: it was billed at its worst case.
    assert await state.settle([Reservation("spend:{team}:day", -2.0, None, 1000)], second) == "recovered"
    assert await state.get("spend:{team}:day") == 2.5
    lost = Pending("team", "id-never-stored", {}, deadline=30)
    assert await state.settle([Reservation("spend:{team}:day", -2.0, None, 1000)], lost) == "missing"
    assert await state.get("spend:{team}:day") == 2.5


async def test_put_new_stores_once(state, clock):
    assert await state.put_new("idem:{k}:1", b"first", ttl=10) is None
    assert await state.put_new("idem:{k}:1", b"second", ttl=10) == b"first"
    await state.put("idem:{k}:1", b"done", ttl=10)
    assert await state.load("idem:{k}:1") == b"done"
    await state.delete("idem:{k}:1")
    assert await state.load("idem:{k}:1") is None
