"""The shared conformance suite (issue 12): every provider passes the same checks through a real
gateway against its fake upstream (tests/conformance.py lists them): the reference's examples,
what was sent validated against the provider's spec, content-policy refusals in each
provider's own shape, upstream errors, timeouts, and a usage record whose cost is the cost
header's. What a provider cannot do is said once, in its entry (`cannot`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
import yaml

from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conformance import ENTRIES, KEY, PROVIDER_NAMES, RETRY_AFTER, Entry
from tests.conftest import AUTH, CLIENT_KEY, IMAGES_RESPONSE, assert_each_image_is, assert_error, download, images_body, serve_fake, usage_record
from tests.fakes import png_size

URL = "/v1/images/generations"
# The reference's examples (docs: images-api-reference.txt), as each entry can take them.
OTTER = "A cute baby sea otter wearing a tiny chef hat, preparing sushi"
LOGO = "Minimalist logo design for a tech startup"
PATTERN = "Abstract geometric pattern in blue and gold"
FOREST = "A magical forest with glowing mushrooms"


@pytest.fixture(params=ENTRIES, ids=[entry.id for entry in ENTRIES])
def entry(request) -> Entry:
    return request.param


@pytest.fixture
async def upstream(entry, aiohttp_server):
    """The entry's fake, started; at the end everything imgproxy sent it must have matched its spec."""
    if entry.fake is None:
        yield None
        return
    async for fake in serve_fake(aiohttp_server, entry.fake()):
        yield fake


@pytest.fixture
def gateway(entry, upstream, aiohttp_client, tmp_path, usage_log):
    """A gateway in front of the entry's fake, its config built as data."""

    async def make(total: float = 5, attempts: int = 1):
        provider = {**entry.provider(upstream, tmp_path), "timeouts": {"connect": 2, "total": total}, "retries": {"attempts": attempts, "backoff": 0}}
        config = {
            "auth": {"keys": [{"name": "team-a", "key": CLIENT_KEY}]},
            "providers": {PROVIDER_NAMES[entry.id]: provider},
            "models": entry.models,
            "images": {"directory": str(tmp_path / "images"), "signing_key": "test-signing-key"},
            "cost": {"usage_log": str(usage_log), **entry.cost},
        }
        gw = await Gateway.load(text=yaml.safe_dump(config), env={})
        return await aiohttp_client(create_app(gw))

    return make


def skip_unless(entry: Entry, check: str) -> None:
    if check in entry.cannot:
        pytest.skip(f"{entry.id}: {entry.cannot[check]}")


async def cost_is_recorded(resp, usage_log) -> dict:
    """The request's usage record, whose cost the client was told in the cost header."""
    record = await usage_record(usage_log, resp.headers["x-request-id"])
    assert resp.headers["x-imgproxy-cost-usd"] == f"{record['cost_usd']:.6f}", (dict(resp.headers), record)
    return record


async def assert_images(client, entry: Entry, answer: dict, response_format: str | None, n: int, size: str) -> None:
    response_format = response_format or entry.default_format
    assert len(answer["data"]) == n, answer
    assert all(set(item) <= {response_format, "revised_prompt"} for item in answer["data"]), answer  # no provider's annotations
    if entry.image is not None:
        await assert_each_image_is(client, answer, response_format, entry.image)
    else:  # made in the gateway: a PNG of the size asked for, one different image each
        images = [await (await download(client, item["url"])).read() for item in answer["data"]]
        assert all(png_size(image) == tuple(map(int, size.split("x"))) for image in images)
        assert len(set(images)) == n


def assert_billed(entry: Entry, record: dict, n: int, size: str = "1024x1024") -> None:
    assert (record["status"], record["images"]) == (200, n), record
    if entry.price is None:
        assert record["cost_usd"] > 0, record  # priced by tokens or credits: never silently free
    else:
        price = entry.price[size] if isinstance(entry.price, dict) else entry.price
        assert record["cost_usd"] == pytest.approx(n * price), record


def assert_sent_and_valid(upstream) -> None:
    """The fake received the call and found it within the provider's spec."""
    if upstream is not None:
        assert upstream.requests, "the fake received nothing"
        assert upstream.invalid == [], upstream.invalid


async def assert_cut_after_the_status(resp, usage_log, error: str) -> None:
    """A b64_json answer relayed as it arrives sent its status with its first bytes: a failure
    after that reaches the client as a cut connection, and the record holds it, at cost 0."""
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    record = await usage_record(usage_log, resp.headers["x-request-id"])
    assert (record["status"], record["error"], record["images"], record["cost_usd"]) == (200, error, 0, 0), record
    assert "x-imgproxy-cost-usd" not in resp.headers  # it left before the cost was known (docs/policies.md)


# The reference's examples.


@pytest.mark.parametrize("example", ["basic", "multiple"])
async def test_reference_example(entry, upstream, gateway, usage_log, example):
    if example == "multiple":
        skip_unless(entry, "n>1")
    client = await gateway()
    n, size, prompt = (1, "1024x1024", OTTER) if example == "basic" else (entry.max_n, entry.size, LOGO)
    resp = await client.post(URL, json={"model": entry.model, "prompt": prompt, "n": n, "size": size}, headers=AUTH)
    await assert_images(client, entry, await images_body(resp), None, n, size)
    assert_sent_and_valid(upstream)
    assert_billed(entry, await cost_is_recorded(resp, usage_log), n, size)


async def test_reference_base64_example_with_the_official_sdk(entry, upstream, gateway, usage_log, sdk_for):
    client = await gateway()
    n = min(entry.max_n, 2)
    raw = await sdk_for(client).images.with_raw_response.generate(model=entry.model, prompt=PATTERN, n=n, response_format="b64_json")
    answer = json.loads(raw.content)
    assert list(IMAGES_RESPONSE.iter_errors(answer)) == [], answer
    assert len(raw.parse().data) == n
    if entry.image is not None:
        await assert_each_image_is(client, answer, "b64_json", entry.image)
    assert_sent_and_valid(upstream)
    record = await usage_record(usage_log, raw.headers["x-request-id"])
    assert raw.headers["x-imgproxy-cost-usd"] == f"{record['cost_usd']:.6f}"
    assert_billed(entry, record, n)


async def test_reference_provider_prefixed_example(entry, upstream, gateway):
    client = await gateway()
    model = f"{PROVIDER_NAMES[entry.id]}/{entry.model}"
    answer = await images_body(await client.post(URL, json={"model": model, "prompt": FOREST}, headers=AUTH))
    await assert_images(client, entry, answer, None, 1, "1024x1024")
    assert_sent_and_valid(upstream)


HD_EXAMPLES = {
    "landscape": {"prompt": "A futuristic cyberpunk cityscape at night", "quality": "hd", "size": "1792x1024", "style": "vivid"},
    "portrait": {"prompt": "Professional portrait photograph of a senior software engineer", "size": "1024x1792", "style": "natural", "quality": "hd"},
}


@pytest.mark.parametrize("example", HD_EXAMPLES)
async def test_reference_hd_examples_are_honoured_or_refused_before_any_call(entry, upstream, gateway, example):
    """dall-e-3's examples: a provider that cannot honour a parameter refuses it with a 400
    naming it, and calls nothing (docs/providers.md: passed, translated or refused)."""
    client = await gateway()
    body = {"model": entry.model, **HD_EXAMPLES[example]}
    resp = await client.post(URL, json=body, headers=AUTH)
    if resp.status == 200:
        await assert_images(client, entry, await images_body(resp), None, 1, body["size"])
        assert_sent_and_valid(upstream)
        return
    error = (await resp.json())["error"]
    assert error["param"] in body and error["param"] in error["message"].lower(), error
    await assert_error(resp, 400, error["code"], error["param"])
    assert error["code"] in ("invalid_size", "invalid_quality", "invalid_style", "unsupported_parameter", "invalid_value"), error
    assert upstream is None or upstream.requests == []  # refused before anything was sent (or paid)
    assert resp.headers["x-imgproxy-cost-usd"] == "0.000000"


# The fakes check what imgproxy sends them.


async def test_the_fake_checks_what_imgproxy_sends(entry, upstream, gateway):
    """A request outside the provider's spec, sent with the very headers imgproxy sent, is
    noticed by the fake: a fake that stopped validating would pass anything."""
    skip_unless(entry, "wire spec")
    client = await gateway()
    await images_body(await client.post(URL, json={"model": entry.model, "prompt": FOREST}, headers=AUTH))
    assert_sent_and_valid(upstream)
    path, body = entry.probe
    headers = {k: v for k, v in upstream.headers[-1].items() if k.lower() not in ("host", "content-length", "content-type", "transfer-encoding")}
    async with aiohttp.ClientSession() as session:
        async with session.post(upstream.base_url + path, json=body, headers=headers) as resp:
            await resp.read()
    assert upstream.invalid, f"{type(upstream).__name__} took a request outside its spec: {body}"
    upstream.invalid.clear()


# Content-policy refusals, each in its provider's own shape.


def refusal_cases():
    for entry in ENTRIES:
        for refusal in entry.refusals:
            yield pytest.param(entry, refusal, id=f"{entry.id}-{refusal.prompt.replace(' ', '-')}")


@pytest.mark.parametrize("entry, refusal", list(refusal_cases()))
async def test_content_policy_refusal(entry, refusal, upstream, gateway, usage_log):
    client = await gateway()
    resp = await client.post(URL, json={"model": entry.model, "prompt": refusal.prompt, "n": refusal.n}, headers=AUTH)
    error = await assert_error(resp, 400, refusal.code, refusal.param)
    assert all(word in error["message"] for word in refusal.words), error
    assert error["type"] == refusal.type, error
    assert resp.headers["x-should-retry"] == "false"  # it would be refused again
    assert_sent_and_valid(upstream)
    record = await cost_is_recorded(resp, usage_log)
    assert (record["status"], record["cost_usd"]) == (400, 0), record


# Upstream failures: the documented status, an envelope without the key, nothing billed.


def failure(entry: Entry, kind: str) -> tuple[dict, int, str, str | None, str]:
    """(the fake's cue, status, code, param, words kept) of one failure of the entry's upstream."""
    if kind == "429":
        return {"status": 429, "body": entry.rate_limited, "headers": {"Retry-After": RETRY_AFTER}}, 429, "rate_limit_exceeded", None, ""
    if kind == "429 garbled Retry-After":
        return {"status": 429, "body": entry.rate_limited, "headers": {"Retry-After": f"soon; {KEY}"}}, 429, "rate_limit_exceeded", None, ""
    if kind in ("500", "503"):
        return {"status": int(kind), "body": entry.server_error}, 502, "upstream_error", None, ""
    if kind == "4xx":
        status, body = entry.bad_request
        return {"status": status, "body": body}, 400, entry.bad_request_code, entry.bad_request_param, entry.bad_request_words
    if kind == "malformed json":
        return {"body": b'{"created": 1, "data": [{"url": "htt', "content_type": "application/json"}, 502, "upstream_bad_response", None, ""
    return {"cut": True}, 502, "upstream_bad_response", None, ""


@pytest.mark.parametrize(
    "kind, response_format",
    [("429", "url"), ("429 garbled Retry-After", "url"), ("500", "url"), ("503", "url"), ("4xx", "url"), ("malformed json", "url"), ("malformed json", "b64_json"), ("cut", "url"), ("cut", "b64_json")],
)
async def test_upstream_failure(entry, upstream, gateway, usage_log, kind, response_format):
    skip_unless(entry, "upstream errors")
    client = await gateway()
    cue, status, code, param, words = failure(entry, kind)
    upstream.cue(**cue)
    resp = await client.post(URL, json={"model": entry.model, "prompt": FOREST, "response_format": response_format}, headers=AUTH)
    if kind == "cut" and response_format == "b64_json" and entry.relays_b64:
        await assert_cut_after_the_status(resp, usage_log, "upstream_bad_response")
        return
    error = await assert_error(resp, status, code, param)
    assert words in error["message"]
    answer = json.dumps(error) + str(dict(resp.headers))
    assert KEY not in answer and KEY[:8] not in answer and f"{KEY[:5]}***" not in answer, error
    if kind == "429":
        assert resp.headers["Retry-After"] == RETRY_AFTER
    if kind == "429 garbled Retry-After":  # never passed on; at most the provider's documented wait
        assert resp.headers.get("Retry-After", "0").isdigit(), dict(resp.headers)
    # Worth a retry only where the provider surely produced nothing and may answer next time.
    assert resp.headers["x-should-retry"] == ("true" if kind.startswith(("429", "5")) else "false")
    assert_sent_and_valid(upstream)
    record = await cost_is_recorded(resp, usage_log)
    ambiguous = kind in ("malformed json", "cut")  # sent, and answered in a way that may hide an accepted call
    assert (record["status"], record["images"]) == (status, 0), record
    assert record["cost_usd"] == pytest.approx(entry.billed_if_ambiguous if ambiguous else 0), record


@pytest.mark.parametrize("kind", ["429", "503"])
async def test_a_failure_that_produced_nothing_is_retried_per_policy_and_billed_once(entry, upstream, gateway, usage_log, kind):
    skip_unless(entry, "upstream errors")
    client = await gateway(attempts=2)
    cue, *_ = failure(entry, kind)
    upstream.cue(**{**cue, "headers": {"Retry-After": "0"}})
    resp = await client.post(URL, json={"model": entry.model, "prompt": FOREST}, headers=AUTH)
    answer = await images_body(resp)
    await assert_images(client, entry, answer, None, 1, "1024x1024")
    assert len(upstream.requests) == 2  # refused, then asked again
    record = await cost_is_recorded(resp, usage_log)
    assert record["attempts"] == 2, record
    assert_billed(entry, record, 1)


# Timeouts.


def timeout_cases():
    for entry in ENTRIES:
        # A stall in b64_json differs from one in url only where b64_json answers are relayed.
        for how in ("silent", "stalls mid-answer") + (("stalls mid-answer (b64_json)",) if entry.relays_b64 else ()):
            yield pytest.param(entry, how, id=f"{entry.id}-{how}")


@pytest.mark.parametrize("entry, how", list(timeout_cases()))
async def test_an_upstream_that_never_answers_is_504_in_bounded_time(entry, upstream, gateway, usage_log, how):
    skip_unless(entry, "timeout")
    client = await gateway(total=0.3)
    upstream.cue(delay=3, stall=how != "silent")
    response_format = "b64_json" if "b64_json" in how else "url"
    async with asyncio.timeout(10):  # an outer bound, not a measure of speed
        resp = await client.post(URL, json={"model": entry.model, "prompt": FOREST, "response_format": response_format}, headers=AUTH)
        if entry.relays_b64 and response_format == "b64_json":
            await assert_cut_after_the_status(resp, usage_log, "upstream_timeout")
            return
        await assert_error(resp, 504, "upstream_timeout")
    assert resp.headers["x-should-retry"] == "false"  # the provider may have generated it
    record = await cost_is_recorded(resp, usage_log)
    assert (record["status"], record["images"]) == (504, 0), record
    assert record["cost_usd"] == pytest.approx(entry.billed_if_ambiguous), record


def test_what_each_provider_cannot_support_is_documented():
    """docs/providers.md lists exactly the entries' skips, with their reasons."""
    docs = (Path(__file__).parents[1] / "docs" / "providers.md").read_text()
    table = docs.split("What a provider cannot support, and why", 1)[1].split("\n\n", 2)[1]
    rows = {tuple(cell.strip().strip("`") for cell in line.strip("|").split("|")) for line in table.splitlines()[2:]}
    assert rows == {(entry.id, check, why) for entry in ENTRIES for check, why in entry.cannot.items()}

