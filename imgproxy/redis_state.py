"""The state backend on Redis (or Valkey), shared by every replica.

Each operation is one Lua script, so it is atomic on the server; the scripts use the server's
clock (`TIME`), so replicas agree on time whatever their own clocks say. All keys of one call
carry the same `{scope}` hash tag, so a script also runs on Redis Cluster. Every call has a
timeout; a failure is raised as `StateUnavailable` for the caller's policy to handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from typing import Callable
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .state import Pending, RateDecision, RateLimit, Reservation, StateUnavailable

# Time: ARGV[1] is the caller's clock when a test sets one, else empty: the server's TIME.
_NOW = """
local function now_of(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) if x == math.huge then return 'inf' end return string.format('%.17g', x) end
-- A counter is a hash {v = value, e = expires at}; the server-side expiry only collects garbage.
local function counter(key, now)
  local got = redis.call('HMGET', key, 'v', 'e')
  if got[1] and tonumber(got[2]) > now then return tonumber(got[1]), tonumber(got[2]) end
  return 0, nil
end
local function put_counter(key, value, expires, now)
  redis.call('HSET', key, 'v', num(value), 'e', num(expires))
  redis.call('PEXPIRE', key, math.ceil((expires - now) * 1000) + 1000)
end
local function apply(key, amount, ttl, now)
  local value, expires = counter(key, now)
  if expires == nil then expires = now + ttl end
  put_counter(key, value + amount, expires, now)
  return value + amount
end
"""

# The same algorithm as imgproxy.state.gcra, all limits charged or none.
RATE_LIMIT = _NOW + """
local now = now_of(ARGV[1])
local function gcra(stored, limit, period, cost)
  local interval = period / limit
  local tat = math.max(stored, now)
  local new_tat = tat + interval * cost
  if new_tat - now <= period + 1e-9 then
    return true, new_tat, math.floor((period - (new_tat - now)) / interval + 1e-9), new_tat - now, 0
  end
  local retry = math.huge
  if cost <= limit then retry = new_tat - period - now end
  return false, stored, math.floor((period - (tat - now)) / interval + 1e-9), tat - now, retry
end
local stored, planned, all_allowed = {}, {}, true
for i, key in ipairs(KEYS) do
  stored[i] = tonumber(redis.call('GET', key) or '0')
  local base = 1 + (i - 1) * 3
  planned[i] = {gcra(stored[i], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]))}
  if not planned[i][1] then all_allowed = false end
end
local out = {}
for i, key in ipairs(KEYS) do
  local p = planned[i]
  if all_allowed then
    redis.call('SET', key, num(p[2]), 'PX', math.ceil((p[2] - now) * 1000) + 1000)
  elseif p[1] then
    local base = 1 + (i - 1) * 3
    p = {gcra(stored[i], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), 0)}
  end
  table.insert(out, p[1] and 1 or 0)
  table.insert(out, p[3])
  table.insert(out, num(p[4]))
  table.insert(out, num(p[5]))
end
return out
"""

# KEYS: the counters, then (when ARGV[2] is not empty) the pending zset and hash.
# ARGV: now, pending id, pending record, pending deadline (seconds from now), then per
# counter: amount, limit ('' for none), ttl.
RESERVE = _NOW + """
local now = now_of(ARGV[1])
local n = #KEYS
if ARGV[2] ~= '' then n = n - 3 end
for i = 1, n do
  local limit = ARGV[4 + (i - 1) * 3 + 2]
  if limit ~= '' then
    local value = counter(KEYS[i], now)
    if value + tonumber(ARGV[4 + (i - 1) * 3 + 1]) > tonumber(limit) + 1e-9 then return i end
  end
end
for i = 1, n do
  local base = 4 + (i - 1) * 3
  apply(KEYS[i], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 3]), now)
end
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[n + 1], now + tonumber(ARGV[4]), ARGV[2])
  redis.call('HSET', KEYS[n + 2], ARGV[2], ARGV[3])
end
return 0
"""

# As RESERVE without limits; with a pending id, only if that record is still there (else
# whether a sweeper claimed it). KEYS end with the pending zset, hash and recovered zset.
SETTLE = _NOW + """
local now = now_of(ARGV[1])
local n = #KEYS
if ARGV[2] ~= '' then
  n = n - 3
  if redis.call('ZREM', KEYS[n + 1], ARGV[2]) == 0 then
    if redis.call('ZSCORE', KEYS[n + 3], ARGV[2]) then return 'recovered' end
    return 'missing'
  end
  redis.call('HDEL', KEYS[n + 2], ARGV[2])
end
for i = 1, n do
  local base = 4 + (i - 1) * 3
  apply(KEYS[i], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 3]), now)
end
return 'settled'
"""

# KEYS: pending zset, hash, recovered zset (ids claimed in the last day). ARGV: now, how many at most.
CLAIM = _NOW + """
local now = now_of(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 86400)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[3], now, id)
  local record = redis.call('HGET', KEYS[2], id)
  redis.call('HDEL', KEYS[2], id)
  if record then table.insert(out, record) end
end
return out
"""

ADD = _NOW + """
local now = now_of(ARGV[1])
return num(apply(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3]), now))
"""

GET = _NOW + """
local value = counter(KEYS[1], now_of(ARGV[1]))
return num(value)
"""

SET = _NOW + """
local now = now_of(ARGV[1])
put_counter(KEYS[1], tonumber(ARGV[2]), now + tonumber(ARGV[3]), now)
return 1
"""

PENDING_SCOPES = "pending-scopes"  # an index of the scopes that have had pending records
MAX_UNCERTAIN = 10_000  # timed-out reservations kept to undo (past that, recovery bills them)


def masked_url(url: str) -> str:
    """The URL with its password replaced, for logs: in `user:password@` and in the query
    (redis-py also takes `?password=`)."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        url = urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{netloc}"))
    base, mark, query = url.partition("?")
    arguments = [(item.partition("=")[0], item) for item in query.split("&")] if mark else []
    return base + mark + "&".join(f"{name}=***" if unquote_plus(name) == "password" else item for name, item in arguments)


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the first non-empty `{...}` in the key, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


class RedisState:
    def __init__(self, url: str, key_prefix: str = "imgproxy:", timeout: float = 0.5, clock: Callable[[], float] | None = None) -> None:
        self.url = masked_url(url)
        self.prefix = key_prefix
        self.timeout = timeout
        self.clock = clock  # tests only: the scripts use the server's clock otherwise
        # One quick retry on a fresh connection, for pooled connections that died with a Redis
        # restart; none after a timeout, when the server may have run the script already.
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), health_check_interval=30,
        )
        self._scopes_seen: set[str] = set()
        # Reservations whose script failed: after a timeout the server may still run it, so the
        # next sweep undoes whatever of them did land (a refused request must not stay reserved).
        self._uncertain: list[tuple[list[Reservation], Pending]] = []
        register = self.redis.register_script
        self._rate_limit, self._reserve, self._settle, self._claim = register(RATE_LIMIT), register(RESERVE), register(SETTLE), register(CLAIM)
        self._add, self._get, self._set = register(ADD), register(GET), register(SET)

    def _now(self) -> str:
        return "" if self.clock is None else repr(self.clock())

    def _keys(self, keys: list[str]) -> list[str]:
        if len({hash_tag(key) for key in keys}) > 1:
            raise ValueError(f"keys of one state call must share a {{scope}}: {keys}")
        return [self.prefix + key for key in keys]

    async def _call(self, operation):
        # The socket timeouts bound each read; this bounds the whole call, retries included.
        try:
            async with asyncio.timeout(self.timeout * 4):
                return await operation
        except (RedisError, OSError, TimeoutError) as exc:
            error = StateUnavailable(f"redis at {self.url}: {type(exc).__name__}: {exc}")
            error.timed_out = isinstance(exc, (TimeoutError, RedisTimeoutError))  # sent, perhaps run
            raise error from None

    async def rate_limit(self, limits: list[RateLimit]) -> list[RateDecision]:
        args: list = [self._now()]
        for limit in limits:
            args += [limit.limit, repr(float(limit.period)), limit.cost]
        out = await self._call(self._rate_limit(keys=self._keys([limit.key for limit in limits]), args=args))
        return [
            RateDecision(bool(out[i]), limit.limit, int(out[i + 1]), float(out[i + 2]), float(out[i + 3]))
            for limit, i in zip(limits, range(0, len(out), 4))
        ]

    @staticmethod
    def _pending_keys(scope: str) -> list[str]:
        return [f"pending:{{{scope}}}", f"pending:{{{scope}}}:records", f"pending:{{{scope}}}:recovered"]

    def _counter_args(self, items: list[Reservation], pending: Pending | None) -> tuple[list, list]:
        keys = [item.key for item in items]
        args: list = [self._now(), "", "", ""]
        if pending is not None:
            keys += self._pending_keys(pending.scope)
            args[1:] = [pending.id, json.dumps(pending.record), repr(float(pending.deadline))]
        for item in items:
            args += [repr(float(item.amount)), "" if item.limit is None else repr(float(item.limit)), repr(float(item.ttl))]
        return self._keys(keys), args

    async def reserve(self, reservations: list[Reservation], pending: Pending | None = None) -> int | None:
        if pending is not None and pending.scope not in self._scopes_seen:
            await self._call(self.redis.sadd(self.prefix + PENDING_SCOPES, pending.scope))
            self._scopes_seen.add(pending.scope)
        keys, args = self._counter_args(reservations, pending)
        try:
            failed = await self._call(self._reserve(keys=keys, args=args))
        except StateUnavailable as exc:
            if pending is not None and exc.timed_out and len(self._uncertain) < MAX_UNCERTAIN:
                self._uncertain.append((reservations, pending))
            raise
        except asyncio.CancelledError:
            # Cancelled (a shutdown's drain timeout) once the script may have been sent: it can
            # still run, so it is undone as a timed-out one is, at the latest when this replica stops.
            if pending is not None and len(self._uncertain) < MAX_UNCERTAIN:
                self._uncertain.append((reservations, pending))
            raise
        if failed != 0:
            return failed - 1
        if pending is not None:
            pending.stored = True
        return None

    async def settle(self, adjustments: list[Reservation], pending: Pending | None = None) -> str:
        keys, args = self._counter_args(adjustments, pending)
        return (await self._call(self._settle(keys=keys, args=args))).decode()

    async def claim_expired(self, limit: int = 100) -> list[dict]:
        await self._undo_uncertain()
        index = self.prefix + PENDING_SCOPES
        if self._scopes_seen:  # restore the index if Redis restarted empty since it was written
            await self._call(self.redis.sadd(index, *self._scopes_seen))
        scopes = await self._call(self.redis.smembers(index))
        records = []
        for scope in sorted(s.decode() for s in scopes):
            keys = self._keys(self._pending_keys(scope))
            for raw in await self._call(self._claim(keys=keys, args=[self._now(), limit])):
                records.append(json.loads(raw))
        return records

    async def put_new(self, key: str, value: bytes, ttl: float) -> bytes | None:
        # SET NX GET: stored (answer None), or the value already there (Redis 7).
        return await self._call(self.redis.set(self.prefix + key, value, px=math.ceil(ttl * 1000), nx=True, get=True))

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._call(self.redis.set(self.prefix + key, value, px=math.ceil(ttl * 1000)))

    async def load(self, key: str) -> bytes | None:
        return await self._call(self.redis.get(self.prefix + key))

    async def delete(self, key: str) -> None:
        await self._call(self.redis.delete(self.prefix + key))

    async def add(self, key: str, amount: float, ttl: float) -> float:
        return float(await self._call(self._add(keys=self._keys([key]), args=[self._now(), repr(float(amount)), repr(float(ttl))])))

    async def get(self, key: str) -> float:
        return float(await self._call(self._get(keys=self._keys([key]), args=[self._now()])))

    async def set(self, key: str, value: float, ttl: float) -> None:
        await self._call(self._set(keys=self._keys([key]), args=[self._now(), repr(float(value)), repr(float(ttl))]))

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self.redis.ping()))
        except StateUnavailable:
            return False

    async def _undo_uncertain(self) -> None:
        """Undo the reservations whose script may have run after the client gave up on it
        (settling only removes what is still pending: one that never ran changes nothing)."""
        while self._uncertain:
            reservations, pending = self._uncertain[0]
            await self.settle([Reservation(item.key, -item.amount, None, item.ttl) for item in reservations], pending)
            self._uncertain.pop(0)

    async def close(self) -> None:
        # A replica that stops undoes its uncertain reservations while it can: no other replica
        # knows of them, and recovery would bill them at their worst case.
        with contextlib.suppress(StateUnavailable):
            await self._undo_uncertain()
        await self.redis.aclose()
