"""What a request gets when the shared state cannot be reached (`state.on_unavailable`).

`closed`: a decision that needs the state is refused with 503 `state_unavailable`.
`open`: the request is admitted as if no limit applied; logged (at most once per
LOG_EVERY seconds) and counted in `imgproxy_state_errors_total{operation}`.
Bookkeeping after the fact (settling, sweeping) raises `StateUnavailable` either way: its
callers keep what they could not write and try again.
"""

from __future__ import annotations

import logging
import time

from .errors import GatewayError
from .state import Pending, RateDecision, RateLimit, Reservation, State, StateUnavailable

log = logging.getLogger("imgproxy.state")

RETRY_AFTER = 5  # seconds a refused client is told to wait
LOG_EVERY = 10.0


class GuardedState:
    def __init__(self, inner: State, on_unavailable: str, errors_metric) -> None:
        self.inner = inner
        self.fail_open = on_unavailable == "open"
        self.errors = errors_metric
        self._logged_at = -LOG_EVERY

    def _count(self, operation: str, exc: StateUnavailable, consequence: str) -> None:
        self.errors.labels(operation).inc()
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.error("shared state unavailable during %s, %s: %s", operation, consequence, exc)

    def _failed(self, operation: str, exc: StateUnavailable, decision: bool) -> None:
        """Count and log; then, for a decision, refuse unless failing open. Bookkeeping
        (`decision` false) re-raises for its caller to retry."""
        if not decision:
            self._count(operation, exc, "to be retried")
            raise exc
        self._count(operation, exc, "admitting (on_unavailable: open)" if self.fail_open else "refusing")
        if not self.fail_open:
            raise GatewayError(
                503, "The gateway's shared state is unavailable; try again shortly.", type="server_error",
                code="state_unavailable", headers={"Retry-After": str(RETRY_AFTER)},
            ) from None

    async def rate_limit(self, limits: list[RateLimit]) -> list[RateDecision]:
        try:
            return await self.inner.rate_limit(limits)
        except StateUnavailable as exc:
            self._failed("rate_limit", exc, decision=True)
            return [RateDecision(True, limit.limit, limit.limit, 0.0, 0.0) for limit in limits]

    async def reserve(self, reservations: list[Reservation], pending: Pending | None = None) -> int | None:
        try:
            return await self.inner.reserve(reservations, pending)
        except StateUnavailable as exc:
            self._failed("reserve", exc, decision=True)
            return None

    async def settle(self, adjustments: list[Reservation], pending: Pending | None = None) -> str:
        try:
            return await self.inner.settle(adjustments, pending)
        except StateUnavailable as exc:
            self._failed("settle", exc, decision=False)

    async def claim_expired(self, limit: int = 100) -> list[dict]:
        try:
            return await self.inner.claim_expired(limit)
        except StateUnavailable as exc:
            self._failed("claim_expired", exc, decision=False)

    async def put_new(self, key: str, value: bytes, ttl: float) -> bytes | None:
        try:
            return await self.inner.put_new(key, value, ttl)
        except StateUnavailable as exc:
            self._failed("put_new", exc, decision=True)
            return None

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        try:
            await self.inner.put(key, value, ttl)
        except StateUnavailable as exc:
            # Bookkeeping (an idempotent answer kept after the fact): the caller tries again.
            self._failed("put", exc, decision=False)

    async def load(self, key: str) -> bytes | None:
        try:
            return await self.inner.load(key)
        except StateUnavailable as exc:
            self._failed("load", exc, decision=True)
            return None

    async def delete(self, key: str) -> None:
        try:
            await self.inner.delete(key)
        except StateUnavailable as exc:
            self._failed("delete", exc, decision=True)

    async def add(self, key: str, amount: float, ttl: float) -> float:
        try:
            return await self.inner.add(key, amount, ttl)
        except StateUnavailable as exc:
            self._failed("add", exc, decision=True)
            return 0.0

    async def get(self, key: str) -> float:
        try:
            return await self.inner.get(key)
        except StateUnavailable as exc:
            self._failed("get", exc, decision=True)
            return 0.0

    async def set(self, key: str, value: float, ttl: float) -> None:
        try:
            await self.inner.set(key, value, ttl)
        except StateUnavailable as exc:
            self._failed("set", exc, decision=True)

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()
