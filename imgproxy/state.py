"""Shared state for policy plugins (rate limits, budgets, violation counters, pending
reservations) and for idempotency records.

Every operation is atomic on its own, so the same algorithms run in Redis (as Lua scripts,
imgproxy/redis_state.py) when several replicas must share limits. `MemoryState` keeps it in
this process. Keys that one call uses together share a `{scope}` (a Redis Cluster hash tag).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol


@dataclass(slots=True)
class RateLimit:
    """`limit` units per `period` seconds under `key`; this request takes `cost` units."""

    key: str
    limit: int
    period: float
    cost: int = 1


@dataclass(slots=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_after: float  # seconds until the whole allowance is back
    retry_after: float  # seconds until this request would be allowed (0 when allowed)


@dataclass(slots=True)
class Reservation:
    """Add `amount` to `key` unless that takes it above `limit` (None: no limit)."""

    key: str
    amount: float
    limit: float | None
    ttl: float


class Pending:
    """A durable trace of a paid upstream call in progress: `record` (JSON-ready) stays in the
    state until settled, or until `deadline` seconds have passed and a sweeper claims it.

    `record` may be given as a function that makes it: it is called the first time the record
    is read, so a backend that reads it only when a sweeper claims it (MemoryState) rarely does."""

    __slots__ = ("scope", "id", "deadline", "stored", "_record")

    def __init__(self, scope: str, id: str, record: dict | Callable[[], dict], deadline: float, stored: bool = False) -> None:
        self.scope = scope  # the `{scope}` of the reservation keys it goes with
        self.id = id
        self._record = record
        self.deadline = deadline
        self.stored = stored  # set by the backend once the reservation holds it

    @property
    def record(self) -> dict:
        if callable(self._record):
            self._record = self._record()
        return self._record


class StateUnavailable(Exception):
    """The backend could not be reached or did not answer in time."""

    timed_out = False  # True when the operation may have run on the server all the same


class State(Protocol):
    async def rate_limit(self, limits: list[RateLimit]) -> list[RateDecision]:
        """GCRA over several limits at once: all are charged, or (if any refuses) none."""

    async def reserve(self, reservations: list[Reservation], pending: Pending | None = None) -> int | None:
        """Apply all reservations, or none: returns None, or the index of the first that failed.
        With `pending`, its record is stored in the same atomic step."""

    async def settle(self, adjustments: list[Reservation], pending: Pending | None = None) -> str:
        """Apply adjustments (no limit) and drop the pending record, in one step: "settled".
        Nothing changes when the record is gone: "recovered" (a sweeper claimed it) or "missing"
        (the state lost it, say a Redis restarted without persistence)."""

    async def claim_expired(self, limit: int = 100) -> list[dict]:
        """Remove and return pending records past their deadline; each goes to one caller only."""

    async def put_new(self, key: str, value: bytes, ttl: float) -> bytes | None:
        """Store `value` unless the key exists: None when stored, else the value already there."""

    async def put(self, key: str, value: bytes, ttl: float) -> None: ...

    async def load(self, key: str) -> bytes | None: ...

    async def delete(self, key: str) -> None: ...

    async def add(self, key: str, amount: float, ttl: float) -> float:
        """Add to a counter (created with `ttl` seconds to live) and return its new value."""

    async def get(self, key: str) -> float:
        """A counter's value; 0 when absent or expired."""

    async def set(self, key: str, value: float, ttl: float) -> None:
        """Set a value that expires after `ttl` seconds."""

    async def ping(self) -> bool:
        """Whether the backend answers (for readiness)."""

    async def close(self) -> None: ...


class MemoryState:
    """State in a dict: exact and fast, but per process."""

    PURGE_EVERY = 10_000  # writes between sweeps of expired entries

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._data: dict[str, tuple[float, float]] = {}  # key -> (value, expires_at)
        self._blobs: dict[str, tuple[bytes, float]] = {}
        self._pending: dict[str, tuple[float, Pending]] = {}  # id -> (deadline, pending)
        self._recovered: set[str] = set()
        self._writes = 0

    def _get(self, key: str, now: float) -> float:
        entry = self._data.get(key)
        if entry is None or entry[1] <= now:
            return 0.0
        return entry[0]

    def _put(self, key: str, value: float, expires_at: float) -> None:
        self._data[key] = (value, expires_at)
        self._writes += 1
        if self._writes % self.PURGE_EVERY == 0:
            now = self.clock()
            self._data = {k: v for k, v in self._data.items() if v[1] > now}
            self._blobs = {k: v for k, v in self._blobs.items() if v[1] > now}

    async def rate_limit(self, limits: list[RateLimit]) -> list[RateDecision]:
        now = self.clock()
        planned = [gcra(self._get(limit.key, now), limit, now) for limit in limits]
        if all(decision.allowed for _, decision in planned):
            for limit, (new_tat, _) in zip(limits, planned):
                self._put(limit.key, new_tat, new_tat)
            return [decision for _, decision in planned]
        # Refused: nothing is charged, so the limits that would have passed report what is left.
        return [
            decision if not decision.allowed else gcra(self._get(limit.key, now), replace(limit, cost=0), now)[1]
            for limit, (_, decision) in zip(limits, planned)
        ]

    async def reserve(self, reservations: list[Reservation], pending: Pending | None = None) -> int | None:
        now = self.clock()
        for index, item in enumerate(reservations):
            if item.limit is not None and self._get(item.key, now) + item.amount > item.limit + 1e-9:
                return index
        self._apply(reservations, now)
        if pending is not None:
            # Kept as it is: a record given as a function is made only if a sweeper claims it.
            self._pending[pending.id] = (now + pending.deadline, pending)
            pending.stored = True
        return None

    def _apply(self, items: list[Reservation], now: float) -> None:
        for item in items:
            entry = self._data.get(item.key)
            if entry is None or entry[1] <= now:
                entry = (0.0, now + item.ttl)
            self._put(item.key, entry[0] + item.amount, entry[1])

    async def settle(self, adjustments: list[Reservation], pending: Pending | None = None) -> str:
        if pending is not None and self._pending.pop(pending.id, None) is None:
            return "recovered" if pending.id in self._recovered else "missing"
        # No limit applies; an adjustment of 0 (the worst case was the cost) changes nothing.
        self._apply([item for item in adjustments if item.amount], self.clock())
        return "settled"

    async def claim_expired(self, limit: int = 100) -> list[dict]:
        now = self.clock()
        due = [id for id, (deadline, _) in self._pending.items() if deadline <= now][:limit]
        self._recovered.update(due)
        return [self._pending.pop(id)[1].record for id in due]

    async def put_new(self, key: str, value: bytes, ttl: float) -> bytes | None:
        entry = self._blobs.get(key)
        if entry is not None and entry[1] > self.clock():
            return entry[0]
        await self.put(key, value, ttl)
        return None

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        self._blobs[key] = (value, self.clock() + ttl)

    async def load(self, key: str) -> bytes | None:
        entry = self._blobs.get(key)
        return entry[0] if entry is not None and entry[1] > self.clock() else None

    async def delete(self, key: str) -> None:
        self._blobs.pop(key, None)

    async def add(self, key: str, amount: float, ttl: float) -> float:
        now = self.clock()
        entry = self._data.get(key)
        if entry is None or entry[1] <= now:
            entry = (0.0, now + ttl)
        value = entry[0] + amount
        self._put(key, value, entry[1])
        return value

    async def get(self, key: str) -> float:
        return self._get(key, self.clock())

    async def set(self, key: str, value: float, ttl: float) -> None:
        self._put(key, value, self.clock() + ttl)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()
        self._blobs.clear()


def gcra(stored_tat: float, limit: RateLimit, now: float) -> tuple[float, RateDecision]:
    """The generic cell rate algorithm: `limit` per `period`, bursts up to `limit`.

    The state is one number, the theoretical arrival time (TAT): when the allowance would be
    whole again. Returns the new TAT and the decision.
    """
    interval = limit.period / limit.limit
    tat = max(stored_tat, now)
    new_tat = tat + interval * limit.cost
    if new_tat - now <= limit.period + 1e-9:
        remaining = math.floor((limit.period - (new_tat - now)) / interval + 1e-9)
        return new_tat, RateDecision(True, limit.limit, remaining, new_tat - now, 0.0)
    remaining = math.floor((limit.period - (tat - now)) / interval + 1e-9)
    retry_after = math.inf if limit.cost > limit.limit else new_tat - limit.period - now
    return stored_tat, RateDecision(False, limit.limit, remaining, tat - now, retry_after)
