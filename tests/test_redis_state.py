"""The Redis state backend behind a running gateway: limits shared by two gateways, Redis
stopped and started mid-test (closed and open), the password kept out of logs."""

import asyncio
import contextlib
import json
import logging
import os

import pytest

from imgproxy.redis_state import RedisState, masked_url
from imgproxy.state import RateLimit, StateUnavailable
from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body

URL = "/v1/images/generations"
BODY = {"model": "placeholder", "prompt": "x", "size": "256x256", "response_format": "b64_json"}


def redis_config(config_text, url: str, key_settings: str = "", on_unavailable: str = "closed", extra: str = "") -> str:
    text = config_text(extra=f"state: {{backend: redis, url: '{url}', key_prefix: 't{os.urandom(4).hex()}:', on_unavailable: {on_unavailable}}}\n{extra}")
    if key_settings:
        text = text.replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n      {key_settings}")
    return text


def metric(client, name: str, **labels) -> float:
    return client.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_rate_limit_is_shared_exactly_by_two_gateways(make_client, config_text, redis_server):
    text = redis_config(config_text, redis_server.url, "rate_limit: {requests_per_minute: 7}")
    one, two = await make_client(text), await make_client(text)
    replies = await asyncio.gather(*[(one, two)[i % 2].post(URL, json=BODY, headers=AUTH) for i in range(30)])
    statuses = sorted(r.status for r in replies)
    assert statuses == [200] * 7 + [429] * 23
    # Both gateways admitted some: the limit is one, not one per gateway.
    assert {r.headers["x-ratelimit-remaining-requests"] for r in replies if r.status == 200} == {str(n) for n in range(7)}


async def test_a_budget_is_admitted_exactly_across_two_gateways(make_client, config_text, redis_server, fake_openai):
    # dall-e-2 256x256 costs $0.016: a $0.10 day admits exactly 6.
    text = redis_config(config_text, redis_server.url, "budget: {daily_usd: 0.1}")
    one, two = await make_client(text), await make_client(text)
    body = {"model": "dall-e-2", "prompt": "x", "size": "256x256"}
    replies = await asyncio.gather(*[(one, two)[i % 2].post(URL, json=body, headers=AUTH) for i in range(20)])
    assert sorted(r.status for r in replies) == [200] * 6 + [429] * 14
    assert len(fake_openai.requests) == 6
    # Every reservation was settled to what was delivered: six images' worth.
    spent = await one.gateway.state.get(next(k for k in _spend_keys(one) if ":day:" in k))
    assert spent == pytest.approx(6 * 0.016)


def _spend_keys(client):
    from imgproxy.plugins.cost import spend_periods
    import time

    return [key for _, key, _, _ in spend_periods("team-a", int(time.time() // 60))]


async def test_redis_stopped_and_started_with_on_unavailable_closed(make_client, config_text, own_redis, fake_openai):
    client = await make_client(redis_config(config_text, own_redis.url, "rate_limit: {requests_per_minute: 100}"))
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    own_redis.stop()
    refused = await asyncio.wait_for(client.post(URL, json=BODY, headers=AUTH), 10)  # an answer, never a hang
    await assert_error(refused, 503, "state_unavailable")
    assert refused.headers["Retry-After"] == "5"
    assert metric(client, "imgproxy_state_errors_total", operation="rate_limit") == 1
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["checks"]["state"] is False
    # No upstream call was made for the refused request.
    dalle = await client.post(URL, json={"model": "dall-e-2", "prompt": "x"}, headers=AUTH)
    await assert_error(dalle, 503, "state_unavailable")
    assert fake_openai.requests == []
    own_redis.start()  # same port: the client reconnects by itself
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    assert (await client.get("/readyz")).status == 200
    # The limit kept counting on the restarted (empty) server: 1 used since the restart.
    again = await client.post(URL, json=BODY, headers=AUTH)
    assert again.headers["x-ratelimit-remaining-requests"] == "98"


async def test_redis_stopped_with_on_unavailable_open_admits_logs_and_counts(make_client, config_text, own_redis, caplog):
    client = await make_client(redis_config(config_text, own_redis.url, "rate_limit: {requests_per_minute: 1}", on_unavailable="open"))
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    await assert_error(await client.post(URL, json=BODY, headers=AUTH), 429, "rate_limit_exceeded")
    own_redis.stop()
    with caplog.at_level(logging.ERROR, logger="imgproxy.state"):
        for _ in range(3):
            await images_body(await asyncio.wait_for(client.post(URL, json=BODY, headers=AUTH), 10))
    assert metric(client, "imgproxy_state_errors_total", operation="rate_limit") == 3
    # Logged at a bounded rate: once for the three failures.
    assert len([r for r in caplog.records if "shared state unavailable" in r.getMessage()]) == 1
    own_redis.start()
    await images_body(await client.post(URL, json=BODY, headers=AUTH))
    await assert_error(await client.post(URL, json=BODY, headers=AUTH), 429, "rate_limit_exceeded")


async def test_the_redis_password_never_reaches_the_logs(make_client, config_text, tmp_path, all_log_output):
    from tests.redisserver import RedisServer

    password = "redis-pass-Xy7-secret"
    server = RedisServer(tmp_path, password=password).start()
    try:
        start = len(all_log_output)
        client = await make_client(redis_config(config_text, server.url, "rate_limit: {requests_per_minute: 5}"))
        await images_body(await client.post(URL, json=BODY, headers=AUTH))
        server.stop()
        await assert_error(await client.post(URL, json=BODY, headers=AUTH), 503, "state_unavailable")
        lines = "\n".join(all_log_output[start:])
        assert f"127.0.0.1:{server.port}" in lines  # the URL was logged, masked
        assert password not in lines
    finally:
        server.stop()
    assert masked_url("rediss://app:pw@redis.example:6380/1") == "rediss://app:***@redis.example:6380/1"
    assert masked_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


async def test_keys_of_one_call_must_share_a_hash_tag(redis_server):
    backend = RedisState(redis_server.url, key_prefix="tags:")
    try:
        with pytest.raises(ValueError, match="share"):
            await backend.rate_limit([RateLimit("ratelimit:{a}:requests", 1, 60), RateLimit("ratelimit:{b}:images", 1, 60)])
    finally:
        await backend.close()


async def test_replicas_agree_on_the_servers_clock(redis_server):
    """Without a test clock the scripts read Redis' TIME: two clients see one limit."""
    one, two = RedisState(redis_server.url, key_prefix="clock:"), RedisState(redis_server.url, key_prefix="clock:")
    try:
        limit = RateLimit("{c}:requests", limit=2, period=3600)
        decisions = [(await backend.rate_limit([limit]))[0] for backend in (one, two, one)]
        assert [d.allowed for d in decisions] == [True, True, False]
        assert decisions[2].retry_after == pytest.approx(1800, abs=5)
    finally:
        await one.close()
        await two.close()


async def _usage_records(path, count: int) -> list[dict]:
    deadline = asyncio.get_running_loop().time() + 15
    while asyncio.get_running_loop().time() < deadline:
        found = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    return found


@pytest.mark.parametrize("on_unavailable", ["closed", "open"])
async def test_a_paid_call_is_recorded_once_when_redis_goes_away_mid_call(make_client, config_text, own_redis, fake_openai, tmp_path, on_unavailable):
    usage = tmp_path / "usage.jsonl"
    text = redis_config(
        config_text, own_redis.url, "budget: {daily_usd: 10}", on_unavailable=on_unavailable,
        extra=f"cost: {{usage_log: {usage}}}",
    ).replace("on_unavailable:", "recovery_interval: 0.2, on_unavailable:")
    client = await make_client(text)
    fake_openai.delay = 0.5
    call = asyncio.ensure_future(client.post(URL, json={"model": "dall-e-2", "prompt": "x", "size": "256x256"}, headers=AUTH))
    while not fake_openai.requests:
        await asyncio.sleep(0.01)
    own_redis.stop()  # after the reservation, before the settlement
    await images_body(await call)  # the client gets what was paid for
    assert metric(client, "imgproxy_state_errors_total", operation="settle") == 1
    assert not usage.exists() or usage.read_text() == ""  # not recorded until settled
    own_redis.start()  # empty: it lost the reservation too
    [record] = await _usage_records(usage, 1)
    assert record["cost_usd"] == 0.016 and record["status"] == 200 and "recovered_already" not in record
    assert await client.gateway.state.get(next(k for k in _spend_keys(client) if ":day:" in k)) == pytest.approx(0.016)
    await asyncio.sleep(0.5)  # later sweeps write nothing more
    assert len(usage.read_text().splitlines()) == 1


async def test_open_admits_a_paid_call_while_redis_is_down_and_counts_it_when_back(make_client, config_text, own_redis, fake_openai, tmp_path):
    usage = tmp_path / "usage.jsonl"
    text = redis_config(
        config_text, own_redis.url, "budget: {daily_usd: 10}", on_unavailable="open", extra=f"cost: {{usage_log: {usage}}}"
    ).replace("on_unavailable:", "recovery_interval: 0.2, on_unavailable:")
    client = await make_client(text)
    own_redis.stop()
    await images_body(await client.post(URL, json={"model": "dall-e-2", "prompt": "x", "size": "256x256"}, headers=AUTH))
    assert metric(client, "imgproxy_state_errors_total", operation="reserve") == 1
    own_redis.start()
    [record] = await _usage_records(usage, 1)
    assert record["cost_usd"] == 0.016
    assert await client.gateway.state.get(next(k for k in _spend_keys(client) if ":day:" in k)) == pytest.approx(0.016)


async def test_the_state_section_is_validated(config_text):
    from imgproxy.config import ConfigError
    from imgproxy.gateway import Gateway

    with pytest.raises(ConfigError, match=r"state\.backend"):
        await Gateway.load(text=config_text(extra="state: {backend: etcd}"), env={})
    with pytest.raises(ConfigError, match=r"state\.url"):
        await Gateway.load(text=config_text(extra="state: {backend: redis, url: 'http://127.0.0.1:6379'}"), env={})


async def test_pending_records_written_after_redis_restarted_empty_are_still_swept(own_redis):
    from imgproxy.state import Pending, Reservation

    backend = RedisState(own_redis.url, key_prefix="sweep:")
    try:
        spend = [Reservation("spend:{team}:day", 1.0, None, 100)]
        assert await backend.reserve(spend, Pending("team", "before", {"request_id": "before"}, deadline=0)) is None
        own_redis.stop()
        own_redis.start()  # without persistence: the index of scopes with pending records is gone
        assert await backend.reserve(spend, Pending("team", "after", {"request_id": "after"}, deadline=0)) is None
        assert await backend.claim_expired() == [{"request_id": "after"}]
    finally:
        await backend.close()


@contextlib.asynccontextmanager
async def server_busy(url: str, seconds: float):
    """Another client keeps the server busy with one long script for `seconds` (from 0.2 s
    before the body of the `with` runs to when the script ends, which the exit waits for)."""
    import redis as sync_redis

    busy = "local t = redis.call('TIME') local t0 = t[1] * 1e6 + t[2] " \
           f"repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - t0 > {int(seconds * 1e6)} return 1"
    with sync_redis.Redis.from_url(url) as admin:
        blocker = asyncio.get_running_loop().run_in_executor(None, admin.eval, busy, 0)
        await asyncio.sleep(0.2)
        yield
        await blocker


async def test_a_reservation_that_timed_out_but_landed_is_undone(own_redis):
    """A script the client gave up on (timed out) can still run on the server: the next sweep undoes it,
    or the refused request would stay reserved and later be billed by recovery."""
    from imgproxy.state import Pending, Reservation

    backend = RedisState(own_redis.url, key_prefix="uncertain:", timeout=0.2)
    try:
        spend = [Reservation("spend:{team}:day", 1.0, 10.0, 1000)]
        await backend.reserve([Reservation("spend:{team}:day", 0.0, 10.0, 1000)], Pending("team", "warm", {}, deadline=1000))
        async with server_busy(own_redis.url, 1.2):
            with pytest.raises(StateUnavailable):
                await backend.reserve(spend, Pending("team", "slow", {"request_id": "slow"}, deadline=0))
        assert await backend.get("spend:{team}:day") == 1.0  # it ran after the client gave up
        assert await backend.claim_expired() == []  # the sweep undid it instead of billing it
        assert await backend.get("spend:{team}:day") == 0.0
    finally:
        await backend.close()


async def test_a_password_given_as_a_query_argument_never_reaches_the_logs(make_client, config_text, tmp_path, all_log_output):
    # redis-py also takes `?password=` (the only way to give one with some unix:// URLs).
    from tests.conftest import SECRET_ENV_VALUE
    from tests.redisserver import RedisServer

    server = RedisServer(tmp_path, password=SECRET_ENV_VALUE).start()
    try:
        start = len(all_log_output)
        url = f"redis://127.0.0.1:{server.port}/0?socket_keepalive=true&password=${{REDIS_PASSWORD}}"
        client = await make_client(redis_config(config_text, url, "rate_limit: {requests_per_minute: 5}"), env={"REDIS_PASSWORD": SECRET_ENV_VALUE})
        await images_body(await client.post(URL, json=BODY, headers=AUTH))  # the password was used
        server.stop()
        await assert_error(await client.post(URL, json=BODY, headers=AUTH), 503, "state_unavailable")
        lines = "\n".join(all_log_output[start:])
        assert f"127.0.0.1:{server.port}/0?socket_keepalive=true&password=***" in lines  # the URL was logged, masked
        assert SECRET_ENV_VALUE not in lines
    finally:
        server.stop()
    assert masked_url("unix:///run/redis.sock?db=1&password=pw") == "unix:///run/redis.sock?db=1&password=***"
    assert masked_url("redis://app:pw@redis.example:6380/1?pass%77ord=pw2") == "redis://app:***@redis.example:6380/1?pass%77ord=***"


async def test_a_reservation_cancelled_in_flight_is_undone_before_the_replica_stops(own_redis):
    """A shutdown's drain timeout cancels a request while its reserve script waits on the server:
    the script still runs, and no other replica knows of it. The stopping replica undoes it, or
    recovery would bill a request that never called the provider at its worst case."""
    from imgproxy.state import Pending, Reservation

    backend = RedisState(own_redis.url, key_prefix="cancelled:", timeout=5)
    other = RedisState(own_redis.url, key_prefix="cancelled:")
    try:
        spend = [Reservation("spend:{team}:day", 1.0, 10.0, 1000)]
        await backend.reserve([Reservation("spend:{team}:day", 0.0, 10.0, 1000)], Pending("team", "warm", {}, deadline=1000))
        async with server_busy(own_redis.url, 1.0):
            request = asyncio.create_task(backend.reserve(spend, Pending("team", "cut", {"request_id": "cut"}, deadline=0)))
            await asyncio.sleep(0.3)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
        assert await other.get("spend:{team}:day") == 1.0  # it ran after the request was cancelled
        await backend.close()  # the replica stops
        assert await other.claim_expired() == []  # nothing left for recovery to bill
        assert await other.get("spend:{team}:day") == 0.0
    finally:
        await other.close()
