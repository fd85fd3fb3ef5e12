"""The Idempotency-Key header: a retry gets the first answer without a second upstream call or
charge, on the memory backend and across two gateways sharing Redis."""

import asyncio
import base64
import json
import os

import pytest

from tests.conftest import AUTH, CLIENT_KEY, assert_error, images_body

URL = "/v1/images/generations"
BODY = {"model": "dall-e-2", "prompt": "a lighthouse", "size": "256x256"}  # $0.016, a hosted image URL


def config(config_text, tmp_path, backend: str, url: str = "", idempotency: str = "", prefix: str = "") -> str:
    state = f"state: {{backend: redis, url: '{url}', key_prefix: '{prefix}'}}" if backend == "redis" else ""
    extra = f"{state}\ncost: {{usage_log: {tmp_path / 'usage.jsonl'}}}\n{idempotency}"
    return config_text(extra=extra).replace(f"key: {CLIENT_KEY}", f"key: {CLIENT_KEY}\n      budget: {{daily_usd: 10}}")


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    if request.param == "memory":
        return {"backend": "memory"}
    return {"backend": "redis", "url": request.getfixturevalue("redis_server").url, "prefix": f"idem-{os.urandom(4).hex()}:"}


def records(tmp_path) -> list[dict]:
    path = tmp_path / "usage.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def spent_today(client) -> float:
    import time

    from imgproxy.plugins.cost import spend_periods

    return await client.gateway.state.get(spend_periods("team-a", int(time.time() // 60))[0][1])


async def test_a_retry_gets_the_first_answer_without_a_second_call_or_charge(make_client, config_text, tmp_path, fake_openai, backend):
    client = await make_client(config(config_text, tmp_path, **backend))
    headers = {**AUTH, "Idempotency-Key": "order-1"}
    first = await client.post(URL, json=BODY, headers=headers)
    first_body = await images_body(first)
    assert "x-imgproxy-idempotent-replay" not in first.headers
    retry = await client.post(URL, json=BODY, headers=headers)
    assert await images_body(retry) == first_body  # the same image URL, still valid
    assert retry.headers["x-imgproxy-idempotent-replay"] == "true"
    # The cost header is the answer's own usage record: the first paid, the replay is free.
    assert (first.headers["x-imgproxy-cost-usd"], retry.headers["x-imgproxy-cost-usd"]) == ("0.016000", "0.000000")
    assert (await client.session.get(first_body["data"][0]["url"])).status == 200
    assert len(fake_openai.requests) == 1
    assert await spent_today(client) == pytest.approx(0.016)
    costs = [r["cost_usd"] for r in records(tmp_path)]
    assert sorted(costs) == [0.0, 0.016]  # the replay is recorded, free
    # Another key gets another request.
    await images_body(await client.post(URL, json=BODY, headers={**AUTH, "Idempotency-Key": "order-2"}))
    assert len(fake_openai.requests) == 2


async def test_the_same_key_with_another_body_is_refused(make_client, config_text, tmp_path, fake_openai, backend):
    client = await make_client(config(config_text, tmp_path, **backend))
    headers = {**AUTH, "Idempotency-Key": "order-1"}
    await images_body(await client.post(URL, json=BODY, headers=headers))
    await assert_error(await client.post(URL, json={**BODY, "prompt": "another"}, headers=headers), 409, "idempotency_key_reused")
    assert len(fake_openai.requests) == 1


async def test_a_retry_while_the_first_runs_waits_for_its_answer(make_client, config_text, tmp_path, fake_openai, backend):
    client = await make_client(config(config_text, tmp_path, **backend))
    fake_openai.delay = 0.5
    headers = {**AUTH, "Idempotency-Key": "slow-1"}
    first = asyncio.ensure_future(client.post(URL, json=BODY, headers=headers))
    while not fake_openai.requests:
        await asyncio.sleep(0.01)
    retry = await client.post(URL, json=BODY, headers=headers)
    assert await images_body(retry) == await images_body(await first)
    assert retry.headers["x-imgproxy-idempotent-replay"] == "true"
    assert len(fake_openai.requests) == 1


async def test_a_retry_while_the_first_runs_gets_409_after_the_wait(make_client, config_text, tmp_path, fake_openai):
    client = await make_client(config(config_text, tmp_path, "memory", idempotency="idempotency: {wait: 0}"))
    fake_openai.delay = 0.5
    headers = {**AUTH, "Idempotency-Key": "slow-2"}
    first = asyncio.ensure_future(client.post(URL, json=BODY, headers=headers))
    while not fake_openai.requests:
        await asyncio.sleep(0.01)
    retry = await client.post(URL, json=BODY, headers=headers)
    await assert_error(retry, 409, "request_in_progress")
    assert retry.headers["Retry-After"] == "1"
    await images_body(await first)
    assert len(fake_openai.requests) == 1


async def test_a_request_refused_before_the_upstream_leaves_no_record(make_client, config_text, tmp_path, fake_openai):
    text = config(config_text, tmp_path, "memory").replace("budget: {daily_usd: 10}", "budget: {daily_usd: 0.01}")
    client = await make_client(text)
    headers = {**AUTH, "Idempotency-Key": "refused-1"}
    await assert_error(await client.post(URL, json=BODY, headers=headers), 429, "insufficient_quota")
    # Nothing was kept: the same key with a cheaper body is a new request, decided afresh.
    await images_body(await client.post(URL, json={**BODY, "model": "placeholder"}, headers=headers))


async def test_an_upstream_failure_is_replayed_not_sent_again(make_client, config_text, tmp_path, fake_openai):
    client = await make_client(config(config_text, tmp_path, "memory"))
    fake_openai.cue(status=500, body={"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})
    headers = {**AUTH, "Idempotency-Key": "failed-1"}
    first = await client.post(URL, json=BODY, headers=headers)
    await assert_error(first, 502, "upstream_error")
    retry = await client.post(URL, json=BODY, headers=headers)
    await assert_error(retry, 502, "upstream_error")
    assert retry.headers["x-imgproxy-idempotent-replay"] == "true"
    assert len(fake_openai.requests) == 1


async def test_answers_that_cannot_be_kept_are_never_sent_again(make_client, config_text, tmp_path, fake_openai):
    client = await make_client(config(config_text, tmp_path, "memory", idempotency="idempotency: {max_answer_bytes: 2048}"))
    # A streamed answer is not kept.
    streamed = {"model": "gpt-image-1", "prompt": "x", "stream": True}
    headers = {**AUTH, "Idempotency-Key": "stream-1"}
    resp = await client.post(URL, json=streamed, headers=headers)
    assert resp.status == 200 and b"image_generation.completed" in await resp.read()
    await assert_error(await client.post(URL, json=streamed, headers=headers), 409, "idempotent_answer_unavailable")
    # An answer above max_answer_bytes neither.
    fake_openai.image_b64 = base64.b64encode(os.urandom(3000)).decode()  # valid base64, over the 2048 bytes kept
    large = {"model": "gpt-image-1", "prompt": "x"}
    headers = {**AUTH, "Idempotency-Key": "large-1"}
    await images_body(await client.post(URL, json=large, headers=headers))
    await assert_error(await client.post(URL, json=large, headers=headers), 409, "idempotent_answer_unavailable")
    assert len(fake_openai.requests) == 2


async def test_a_malformed_key_is_refused(client):
    await assert_error(await client.post(URL, json=BODY, headers={**AUTH, "Idempotency-Key": "x" * 256}), 400, "invalid_idempotency_key")


async def test_a_retry_on_the_other_gateway_reaches_the_upstream_once(make_client, config_text, tmp_path, fake_openai, redis_server):
    text = config(config_text, tmp_path, "redis", url=redis_server.url, prefix=f"idem-{os.urandom(4).hex()}:")
    one, two = await make_client(text), await make_client(text)
    fake_openai.delay = 0.3
    headers = {**AUTH, "Idempotency-Key": "cross-1"}
    # Sent to both at once: one calls the upstream, the other waits and replays its answer.
    first, second = await asyncio.gather(one.post(URL, json=BODY, headers=headers), two.post(URL, json=BODY, headers=headers))
    assert await images_body(first) == await images_body(second)
    assert {first.headers.get("x-imgproxy-idempotent-replay"), second.headers.get("x-imgproxy-idempotent-replay")} == {None, "true"}
    later = await two.post(URL, json=BODY, headers=headers)
    assert await images_body(later) == await images_body(first)
    assert len(fake_openai.requests) == 1
    assert await spent_today(one) == pytest.approx(0.016)


async def test_an_upstream_rate_limit_is_not_replayed_to_the_retry_it_asks_for(make_client, config_text, tmp_path, fake_openai, sdk_for):
    # The provider refused the call (nothing generated, nothing billed) and said when to retry:
    # replaying that 429 to every retry for `idempotency.ttl` made the key useless. The official
    # SDK retries a 429 after Retry-After with the same headers, the Idempotency-Key included.
    client = await make_client(config(config_text, tmp_path, "memory"))
    limited = {"error": {"message": "Rate limit reached for images per minute.", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    fake_openai.cue(status=429, body=limited, headers={"Retry-After": "0"})
    sdk = sdk_for(client).with_options(max_retries=2)
    answer = await sdk.images.generate(model="dall-e-2", prompt="a lighthouse", size="256x256", extra_headers={"Idempotency-Key": "limited-1"})
    assert answer.data[0].url
    assert len(fake_openai.requests) == 2  # refused once, then generated once
    # The answer that was generated is kept as usual: a later retry is a replay, not a third call.
    retry = await client.post(URL, json=BODY, headers={**AUTH, "Idempotency-Key": "limited-1"})
    assert retry.headers["x-imgproxy-idempotent-replay"] == "true"
    assert (await images_body(retry))["data"][0]["url"] == answer.data[0].url
    assert len(fake_openai.requests) == 2
    assert [r["cost_usd"] for r in records(tmp_path)] == [0.0, 0.016, 0.0]


async def test_a_refusal_by_the_moderation_model_is_decided_afresh(make_client, config_text, tmp_path, fake_openai):
    # The moderation model is asked before the provider: when it is down (503) nothing was
    # generated or billed, so a retry with the same key must be moderated and generated anew,
    # not get the stored 503 for `idempotency.ttl`.
    from tests.fakes import Cue

    moderation = "moderation:\n  upstream: {provider: openai, model: omni-moderation-latest, timeout: 0.5}\n"
    client = await make_client(config(config_text, tmp_path, "memory", idempotency=moderation))
    fake_openai.moderation_cues.append(Cue(status=500, body={}))
    headers = {**AUTH, "Idempotency-Key": "moderated-1"}
    await assert_error(await client.post(URL, json=BODY, headers=headers), 503, "moderation_unavailable")
    assert fake_openai.requests == []  # no image was asked for
    retry = await client.post(URL, json=BODY, headers=headers)
    assert "x-imgproxy-idempotent-replay" not in retry.headers
    await images_body(retry)
    assert (len(fake_openai.moderation_requests), len(fake_openai.requests)) == (2, 1)
    assert [r["cost_usd"] for r in records(tmp_path)] == [0.0, 0.016]


@pytest.mark.parametrize("on_unavailable", ["open", "closed"])
async def test_an_answer_that_redis_could_not_take_is_kept_once_it_is_back(make_client, config_text, tmp_path, fake_openai, own_redis, on_unavailable):
    # Redis dies while the upstream call runs and comes back empty (no persistence): the
    # in-progress mark is gone, so without the answer a retry would make a second paid call.
    import redis.asyncio as redis

    text = config(config_text, tmp_path, "redis", url=own_redis.url, prefix="idem:").replace(
        "key_prefix: 'idem:'", f"key_prefix: 'idem:', on_unavailable: {on_unavailable}"
    )
    client = await make_client(text)
    headers = {**AUTH, "Idempotency-Key": "order-blip"}
    fake_openai.cue(delay=0.5, body={"created": 1, "data": [{"url": f"{fake_openai.base_url}/files/a.png"}]})
    first = asyncio.ensure_future(client.post(URL, json=BODY, headers=headers))
    while not fake_openai.requests:
        await asyncio.sleep(0.02)
    own_redis.stop()
    first_body = await images_body(await first)
    own_redis.start()
    inspect = redis.Redis.from_url(own_redis.url)
    try:
        for _ in range(100):  # the gateway tries again every half second
            if await inspect.keys("idem:*"):
                break
            await asyncio.sleep(0.1)
        assert await inspect.keys("idem:*"), "the answer was never kept"
    finally:
        await inspect.aclose()
    retry = await client.post(URL, json=BODY, headers=headers)
    assert await images_body(retry) == first_body and retry.headers["x-imgproxy-idempotent-replay"] == "true"
    assert len(fake_openai.requests) == 1
