"""Black Forest Labs FLUX (type: bfl) against a fake that speaks BFL's asynchronous API over a
real socket: submit, poll until Ready, download; every conformance case of issue 12."""

import base64
import json
import os
from pathlib import Path

import aiohttp
import pytest

from imgproxy.egress import UrlRefused
from imgproxy.gateway import Gateway
from imgproxy.providers.bfl import BflProvider
from tests.conftest import AUTH, CLIENT_KEY, assert_error, download, images_body, serve_fake
from tests.fake_bfl import BFL_PNG, FakeBFL
from tests.fakes import Cue, FakeUpstream, png_size, tiny_png

URL = "/v1/images/generations"
SHARED_SPEC = Path(__file__).resolve().parents[2] / "shared" / "specs" / "bfl.yaml"


@pytest.fixture
async def fake_bfl(aiohttp_server):
    async for fake in serve_fake(aiohttp_server, FakeBFL()):
        yield fake


@pytest.fixture
def bfl_config(fake_bfl, tmp_path):
    def make(total: float = 5, extra: str = "", provider: str = "") -> str:
        return f"""
auth:
  keys:
    - {{name: team-a, key: {CLIENT_KEY}}}
providers:
  bfl:
    type: bfl
    base_url: {fake_bfl.base_url}
    api_key: {FakeUpstream.key}
    timeouts: {{connect: 2, total: {total}}}
    options: {{poll_interval: 0.01, max_poll_interval: 0.05}}
    {provider}
models:
  flux-pro-1.1: {{provider: bfl}}
  flux-dev: {{provider: bfl}}
  flux-pro-1.1-ultra: {{provider: bfl}}
  flux-2-pro: {{provider: bfl}}
  flux-2-flex: {{provider: bfl}}
  flux-kontext-pro: {{provider: bfl}}
  flux-kontext-max: {{provider: bfl}}
images:
  directory: {tmp_path / "images"}
  signing_key: test-signing-key
cost: {{usage_log: {tmp_path / "usage.jsonl"}}}
{extra}
"""

    return make


@pytest.fixture
def bfl_client(make_client, bfl_config):
    async def make(**kwargs):
        return await make_client(bfl_config(**kwargs))

    return make


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]


async def post(client, **body):
    return await client.post(URL, json={"model": "flux-pro-1.1", "prompt": "a red fox", **body}, headers=AUTH)


def test_spec_copy_is_the_shared_one():
    if not SHARED_SPEC.is_file():
        pytest.skip("no shared/specs beside this checkout")
    assert (Path(__file__).parent / "specs" / "bfl.yaml").read_bytes() == SHARED_SPEC.read_bytes()


# The reference's basic example: prompt, n, size, in both formats.


async def test_basic_example_b64_json(bfl_client, fake_bfl, tmp_path):
    client = await bfl_client()
    resp = await post(client, n=2, size="1024x768", response_format="b64_json")
    body = await images_body(resp)
    assert [base64.b64decode(item["b64_json"]) for item in body["data"]] == [BFL_PNG, BFL_PNG]
    assert fake_bfl.requests == [{"prompt": "a red fox", "width": 1024, "height": 768}] * 2  # n jobs
    assert fake_bfl.models == ["flux-pro-1.1"] * 2
    assert all(h["x-key"] == FakeUpstream.key for h in fake_bfl.headers)
    # Pending twice, then Ready, for each job; each image downloaded once.
    assert sorted(fake_bfl.polls) == ["job-1"] * 3 + ["job-2"] * 3
    assert fake_bfl.downloads == 2
    [record] = records(tmp_path)
    assert record["images"] == 2 and record["cost_usd"] == pytest.approx(0.08)
    assert resp.headers["x-imgproxy-cost-usd"] == "0.080000"


async def test_basic_example_url_is_hosted_by_the_gateway(bfl_client, fake_bfl):
    client = await bfl_client()
    body = await images_body(await post(client, size="1024x1024"))  # url is the default
    [item] = body["data"]
    assert not item["url"].startswith(fake_bfl.base_url)  # never BFL's 10-minute signed URL
    image = await download(client, item["url"])
    assert image.status == 200 and await image.read() == BFL_PNG
    assert png_size(BFL_PNG) == (3, 1)


async def test_official_sdk(bfl_client, sdk_for, fake_bfl):
    client = await bfl_client()
    sdk = sdk_for(client)
    result = await sdk.images.generate(model="flux-dev", prompt="a red fox", n=1, size="512x512", response_format="b64_json")
    assert base64.b64decode(result.data[0].b64_json) == BFL_PNG
    assert fake_bfl.models == ["flux-dev"] and fake_bfl.requests == [{"prompt": "a red fox", "width": 512, "height": 512}]


# Parameters: passed, translated, refused.


async def test_output_format_passed_and_webp_refused(bfl_client, fake_bfl):
    client = await bfl_client()
    await images_body(await post(client, output_format="png", response_format="b64_json"))
    assert fake_bfl.requests[-1]["output_format"] == "png"
    await assert_error(await post(client, output_format="webp"), 400, "invalid_value", "output_format")
    assert len(fake_bfl.requests) == 1


async def test_ultra_gets_the_size_as_an_aspect_ratio(bfl_client, fake_bfl):
    client = await bfl_client()
    await images_body(await post(client, model="flux-pro-1.1-ultra", size="1792x1024", response_format="b64_json"))
    assert fake_bfl.models == ["flux-pro-1.1-ultra"]
    assert fake_bfl.requests == [{"prompt": "a red fox", "aspect_ratio": "7:4"}]


@pytest.mark.parametrize(
    "extra, param, code",
    [
        ({"quality": "hd"}, "quality", None),
        ({"style": "vivid"}, "style", None),
        ({"size": "1000x1000"}, "size", None),  # not a multiple of 32
        ({"size": "2048x2048"}, "size", None),  # above FLUX 1.1 [pro]'s 1440
        ({"n": 5}, "n", "invalid_n"),
        ({"background": "transparent"}, "background", "unsupported_parameter"),
    ],
)
async def test_refused_parameters_never_reach_bfl(bfl_client, fake_bfl, extra, param, code):
    client = await bfl_client()
    resp = await post(client, **extra)
    error = await resp.json()
    assert resp.status == 400, error
    assert error["error"]["param"] == param
    if code:
        assert error["error"]["code"] == code
    assert fake_bfl.requests == []


async def test_flux2_custom_size_priced_per_megapixel(bfl_client, fake_bfl, tmp_path):
    client = await bfl_client()
    resp = await post(client, model="flux-2-pro", size="1920x1088", n=2, response_format="b64_json")
    await images_body(resp)
    assert fake_bfl.requests[0] == {"prompt": "a red fox", "width": 1920, "height": 1088}
    # 1920x1088 is 1.99 MP (of 1024x1024 pixels): the first at $0.03 and one more at $0.015, per image.
    [record] = records(tmp_path)
    assert record["cost_usd"] == pytest.approx(2 * 0.045)
    resp = await post(client, model="flux-2-flex", size="2048x2048", response_format="b64_json")
    await images_body(resp)
    assert records(tmp_path)[-1]["cost_usd"] == pytest.approx(4 * 0.06)


# Refusals and failures.


async def test_upstream_401_is_502_auth_failed(bfl_client, fake_bfl):
    client = await bfl_client()
    fake_bfl.key, key = "another-key-entirely-0000", fake_bfl.key
    try:
        resp = await post(client)
    finally:
        fake_bfl.key = key
    await assert_error(resp, 502, "upstream_auth_failed")


async def test_402_out_of_credits(bfl_client, fake_bfl):
    client = await bfl_client()
    fake_bfl.cue(status=402, body={"detail": "Insufficient credits"})
    await assert_error(await post(client), 502, "upstream_quota_exceeded")


async def test_422_is_400_with_the_validation_message(bfl_client, fake_bfl):
    client = await bfl_client()
    fake_bfl.cue(status=422, body={"detail": [{"loc": ["body", "width"], "msg": "width must be a multiple of 32", "type": "value_error"}]})
    error = await assert_error(await post(client), 400, "invalid_value")
    assert error["message"] == "width must be a multiple of 32"


async def test_submit_5xx_is_502_and_retried_as_it_produced_nothing(bfl_client, fake_bfl, tmp_path):
    client = await bfl_client(provider="retries: {attempts: 2, backoff: 0.01}")
    fake_bfl.cue(status=503, body={"detail": "overloaded"})
    await images_body(await post(client, response_format="b64_json"))
    assert len(fake_bfl.requests) == 2  # refused, then accepted
    fake_bfl.cue(status=500, body={"detail": "boom"})
    fake_bfl.cue(status=500, body={"detail": "boom"})
    await assert_error(await post(client), 502, "upstream_error")


async def test_error_status_after_acceptance_is_502_billed_and_never_retried(bfl_client, fake_bfl, tmp_path):
    client = await bfl_client(provider="retries: {attempts: 3, backoff: 0.01}")
    resp = await post(client, prompt="make it crash")
    await assert_error(resp, 502, "upstream_bad_response")
    assert len(fake_bfl.requests) == 1  # the job was accepted: a second one could be billed twice
    [record] = records(tmp_path)
    assert record["undelivered_billed"] == 1 and record["cost_usd"] == pytest.approx(0.04)


async def test_job_that_never_finishes_is_504_recorded_at_its_price(bfl_client, fake_bfl, tmp_path):
    client = await bfl_client(total=0.5, provider="retries: {attempts: 3, backoff: 0.01}")
    fake_bfl.never_ready = True
    resp = await post(client, n=2)
    await assert_error(resp, 504, "upstream_timeout")
    assert resp.headers["x-should-retry"] == "false"
    assert len(fake_bfl.requests) == 2 and len(fake_bfl.polls) >= 2  # polled, within the deadline
    assert fake_bfl.downloads == 0
    # Accepted, so BFL runs and bills both jobs: the record says so rather than $0.
    [record] = records(tmp_path)
    assert record["status"] == 504 and record["images"] == 0
    assert record["undelivered_billed"] == 2 and record["cost_usd"] == pytest.approx(0.08)
    assert resp.headers["x-imgproxy-cost-usd"] == "0.080000"


async def test_a_refused_job_beside_an_accepted_one_is_not_retried(bfl_client, fake_bfl, tmp_path):
    # One of two submissions gets 429 (that one produced nothing), the other is accepted and
    # never finishes: whichever error is shown, calling again could pay for a third job.
    client = await bfl_client(total=0.5, provider="retries: {attempts: 3, backoff: 0.01}")
    fake_bfl.never_ready = True
    fake_bfl.cue(status=429, body={"detail": "busy"}, headers={"Retry-After": "0"})
    resp = await post(client, n=2)
    assert resp.status in (429, 504)
    assert resp.headers["x-should-retry"] == "false"
    assert len(fake_bfl.requests) == 2
    [record] = records(tmp_path)
    assert record["undelivered_billed"] == 1 and record["cost_usd"] == pytest.approx(0.04)


@pytest.mark.parametrize("where", ["submit", "poll"])
async def test_cut_body_is_502(bfl_client, fake_bfl, where):
    client = await bfl_client()
    (fake_bfl.cues if where == "submit" else fake_bfl.poll_cues).append(Cue(cut=True))
    await assert_error(await post(client), 502, "upstream_bad_response")


@pytest.mark.parametrize("where", ["submit", "poll"])
async def test_garbage_body_is_502(bfl_client, fake_bfl, where):
    client = await bfl_client()
    (fake_bfl.cues if where == "submit" else fake_bfl.poll_cues).append(Cue(body=b"<html>oops</html>", content_type="application/json"))
    await assert_error(await post(client), 502, "upstream_bad_response")
    assert fake_bfl.downloads == 0


async def test_poll_429_and_5xx_are_asked_again(bfl_client, fake_bfl):
    client = await bfl_client()
    fake_bfl.poll_cues += [Cue(status=429, body={"detail": "slow down"}), Cue(status=502, body={"detail": "bad gateway"})]
    await images_body(await post(client, response_format="b64_json"))
    assert len(fake_bfl.polls) == 5  # two failed polls, two Pending, Ready


# Egress: the polling and result URLs only on the provider's hosts.


@pytest.mark.parametrize("which", ["polling_base", "sample_base"])
async def test_urls_on_other_hosts_are_never_fetched(bfl_client, fake_bfl, tmp_path, which):
    client = await bfl_client(provider="retries: {attempts: 3, backoff: 0.01}")
    setattr(fake_bfl, which, "http://169.254.169.254")
    resp = await post(client, response_format="b64_json")
    await assert_error(resp, 502, "upstream_bad_response")
    assert fake_bfl.downloads == 0
    assert len(fake_bfl.requests) == 1  # a refused URL after acceptance is no reason to submit again
    assert records(tmp_path)[0]["undelivered_billed"] == 1  # accepted all the same


def test_default_hosts_are_bfls():
    from imgproxy.config import ProviderConfig

    provider = BflProvider(ProviderConfig("bfl", "bfl", "", "k", (), 2, 60, ()), upstream=None)
    assert provider.config.base_url == "https://api.bfl.ai"
    egress = provider.config.egress
    egress.target("https://api.us1.bfl.ai/v1/get_result?id=1")
    egress.target("https://delivery-eu1.bfl.ai/results/x.jpeg?sig=1")
    with pytest.raises(UrlRefused):
        egress.target("https://bfl.ai.example.com/x.png")
    with pytest.raises(UrlRefused):
        egress.target("http://delivery-eu1.bfl.ai/results/x.jpeg")  # not over plain http


# Keys and money.


async def test_key_never_in_answers(bfl_client, fake_bfl):
    client = await bfl_client()
    fake_bfl.cue(status=500, body={"detail": f"bad key {FakeUpstream.key}"})
    resp = await post(client)
    text = await resp.text()
    assert FakeUpstream.key not in text
    fake_bfl.cue(status=422, body={"detail": [{"loc": ["body"], "msg": f"key {FakeUpstream.key} invalid", "type": "x"}]})
    resp = await post(client)
    assert FakeUpstream.key not in await resp.text()


async def test_partial_delivery_billed_for_what_was_accepted(bfl_client, fake_bfl, tmp_path):
    client = await bfl_client()
    # The second job's submission is refused (produced nothing); the first is delivered.
    fake_bfl.cues.append(Cue(status=429, body={"detail": "busy"}))
    resp = await post(client, n=2, response_format="b64_json")
    body = await images_body(resp)
    assert len(body["data"]) == 1
    [record] = records(tmp_path)
    assert record["images"] == 1 and record["cost_usd"] == pytest.approx(0.04)


async def test_budget_counts_an_undelivered_job(make_client, bfl_config, fake_bfl):
    text = bfl_config(total=0.5).replace(f"{{name: team-a, key: {CLIENT_KEY}}}", f"{{name: team-a, key: {CLIENT_KEY}, budget: {{daily_usd: 0.05}}}}")
    client = await make_client(text)
    fake_bfl.never_ready = True
    await assert_error(await post(client), 504, "upstream_timeout")
    fake_bfl.never_ready = False
    # $0.04 spent on the job BFL billed: another $0.04 would cross $0.05.
    await assert_error(await post(client), 429, "insufficient_quota")
    assert len(fake_bfl.requests) == 1


def test_gateway_loads_the_public_config():
    text = f"""
auth: {{keys: [{{name: a, key: {CLIENT_KEY}}}]}}
providers:
  bfl: {{type: bfl, api_key: "${{BFL_API_KEY:-}}"}}
models:
  flux-2-pro: {{provider: bfl}}
"""
    import asyncio

    gateway = asyncio.run(Gateway.load(text=text, env={}))
    assert gateway.config.models["flux-2-pro"].capabilities.allows_size("1920x1088")


async def test_per_megapixel_price_from_the_config(make_client, bfl_config, fake_bfl, tmp_path):
    # cost.prices takes the per-megapixel form too; an unknown size would count as the largest.
    text = bfl_config().replace("cost: {usage_log:", "cost: {prices: {flux-dev: {per_megapixel: {first: 0.5, additional: 0.25, max_megapixels: 2}}}, usage_log:")
    client = await make_client(text)
    await images_body(await post(client, model="flux-dev", size="1440x1024", response_format="b64_json"))
    assert records(tmp_path)[0]["cost_usd"] == pytest.approx(0.75)  # 1.41 MP: the first and one more started
    await images_body(await post(client, model="flux-dev", size="512x512", response_format="b64_json"))
    assert records(tmp_path)[1]["cost_usd"] == pytest.approx(0.5)


async def test_three_jobs_one_failing_after_acceptance_delivers_two_and_records_the_third(bfl_client, fake_bfl, tmp_path):
    # n=3 is three jobs in parallel; one ends in Error after BFL accepted it (BFL bills it).
    client = await bfl_client()
    fake_bfl.distinct_images = True
    fake_bfl.poll_cues.append(Cue(body={"id": "job-1", "status": "Error", "details": {"error": "internal"}}))
    resp = await post(client, n=3, response_format="b64_json")
    body = await images_body(resp)
    assert len(fake_bfl.requests) == 3 and fake_bfl.downloads == 2
    assert {base64.b64decode(item["b64_json"]) for item in body["data"]} == {tiny_png(rgb=k.to_bytes(3, "big")) for k in (1, 2)}
    [record] = records(tmp_path)
    # Two delivered, one billed but undelivered: in the record, never as a delivered image.
    assert (record["images"], record["undelivered_billed"]) == (2, 1)
    assert record["cost_usd"] == pytest.approx(3 * 0.04) and resp.headers["x-imgproxy-cost-usd"] == "0.120000"


# Edits through FLUX.1 Kontext: the input images as base64 in the job's JSON body.

EDITS = "/v1/images/edits"
JPEG = b"\xff\xd8\xff\xe0" + os.urandom(200)  # recognised by its first bytes, passed on as it is


def edit_form(fields: dict, files: list[tuple[str, bytes]]) -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    for name, value in {"model": "flux-kontext-pro", "prompt": "add a hat", **fields}.items():
        data.add_field(name, str(value))
    for index, (name, content) in enumerate(files):
        data.add_field(name, content, filename=f"upload-{index}.bin", content_type="application/octet-stream")
    return data


def big_png(size: int) -> bytes:
    """A PNG header followed by `size` random bytes (above 1 MiB the gateway spools it to disk)."""
    return tiny_png(64, 64)[:33] + os.urandom(size)


async def edit(client, fields: dict | None = None, files: list[tuple[str, bytes]] | None = None):
    return await client.post(EDITS, headers=AUTH, data=edit_form(fields or {}, files or [("image", tiny_png(8, 8))]))


async def test_kontext_edit_sends_the_exact_bytes_of_every_image_in_order(bfl_client, fake_bfl, tmp_path):
    client = await bfl_client()
    first, second, third = big_png(3 * 1024 * 1024 // 2), JPEG, tiny_png(5, 7, b"\x09\x08\x07")  # the first from a temporary file
    resp = await edit(client, {"response_format": "b64_json"}, [("image[]", first), ("image[]", second), ("image[]", third)])
    body = await images_body(resp)
    assert [base64.b64decode(item["b64_json"]) for item in body["data"]] == [BFL_PNG]
    assert fake_bfl.models == ["flux-kontext-pro"]
    assert fake_bfl.inputs == [[first, second, third]]
    sent = fake_bfl.requests[0]
    assert sorted(sent) == ["input_image", "input_image_2", "input_image_3", "prompt"]  # size auto: no aspect_ratio, the input's
    assert sent["prompt"] == "add a hat"
    [record] = records(tmp_path)
    assert record["operation"] == "edit" and record["images"] == 1 and record["cost_usd"] == pytest.approx(0.04)


async def test_sdk_edit_with_n_and_a_size(bfl_client, sdk_for, fake_bfl, tmp_path):
    client = await bfl_client()
    image = tiny_png(16, 9, b"\x10\x20\x30")
    result = await sdk_for(client).images.edit(
        model="flux-kontext-max", image=("photo.png", image, "image/png"), prompt="make it night", n=2, size="1792x1024",
        response_format="b64_json", output_format="jpeg",
    )
    assert [base64.b64decode(item.b64_json) for item in result.data] == [BFL_PNG, BFL_PNG]
    # Two jobs, each with the same image and the size as its ratio.
    assert fake_bfl.models == ["flux-kontext-max"] * 2 and fake_bfl.inputs == [[image], [image]]
    assert [{k: v for k, v in r.items() if k != "input_image"} for r in fake_bfl.requests] == [
        {"prompt": "make it night", "aspect_ratio": "7:4", "output_format": "jpeg"}
    ] * 2
    [record] = records(tmp_path)
    assert record["images"] == 2 and record["cost_usd"] == pytest.approx(0.16)


async def test_kontext_generates_from_text_alone_and_its_png_is_labelled_png(bfl_client, fake_bfl):
    client = await bfl_client()
    body = await images_body(await post(client, model="flux-kontext-pro", size="1024x768"))
    assert fake_bfl.requests == [{"prompt": "a red fox", "aspect_ratio": "4:3"}] and fake_bfl.inputs == [[]]
    image = await download(client, body["data"][0]["url"])
    # Kontext makes PNG unless told otherwise (FLUX 1.1 makes JPEG): the hosted file says so.
    assert await image.read() == BFL_PNG and image.headers["Content-Type"] == "image/png"
    await images_body(await post(client, model="flux-kontext-pro", response_format="b64_json"))
    assert fake_bfl.requests[-1] == {"prompt": "a red fox"}  # size auto: BFL's default ratio


@pytest.mark.parametrize(
    "fields, files, status, code, param",
    [
        ({}, [("image", tiny_png(8, 8)), ("mask", tiny_png(8, 8))], 400, "unsupported_parameter", "mask"),  # Kontext takes no mask
        ({}, [("image", b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 40)], 400, "invalid_image_format", "image"),
        ({}, [("image[]", tiny_png(8, 8))] * 5, 400, "too_many_images", "image"),  # input_image to input_image_4
        ({}, [("image", big_png(10 * 1024 * 1024))], 400, "image_too_large", "image"),  # above 10 MiB alone
        ({"size": "1000x1000"}, [("image", tiny_png(8, 8))], 400, "invalid_size", "size"),
        ({"quality": "high"}, [("image", tiny_png(8, 8))], 400, "unsupported_parameter", "quality"),
        ({"model": "flux-pro-1.1"}, [("image", tiny_png(8, 8))], 400, "unsupported_operation", "model"),
    ],
)
async def test_what_kontext_cannot_take_is_refused_before_any_call(bfl_client, fake_bfl, fields, files, status, code, param):
    client = await bfl_client()
    await assert_error(await edit(client, fields, files), status, code, param)
    assert fake_bfl.requests == []


async def test_images_too_large_together_are_refused_before_any_call_or_limit(make_client, bfl_config, fake_bfl, tmp_path):
    # Each under Kontext's 10 MiB, together above the 20 MiB one JSON body may carry: refused
    # with the capabilities, so before the key's rate limit (one request a minute) is charged.
    text = bfl_config().replace(f"{{name: team-a, key: {CLIENT_KEY}}}", f"{{name: team-a, key: {CLIENT_KEY}, rate_limit: {{requests_per_minute: 1}}}}")
    client = await make_client(text)
    files = [("image[]", big_png(7 * 1024 * 1024))] * 3
    error = await assert_error(await edit(client, {}, files), 400, "image_too_large", "image")
    assert "together" in error["message"]
    assert fake_bfl.requests == []
    await images_body(await edit(client, {}, files[:2]))  # 14 MiB: taken, and the minute's one request
    assert [len(images) for images in fake_bfl.inputs] == [2]
    await assert_error(await edit(client), 429, "rate_limit_exceeded")


async def test_the_adapter_bounds_the_json_body_whatever_the_capabilities_say(make_client, bfl_config, fake_bfl):
    # An operator's override lets 30 MiB through the core; the body built in memory stays bounded.
    text = bfl_config().replace(
        "  flux-kontext-pro: {provider: bfl}",
        "  flux-kontext-pro: {provider: bfl, capabilities: {edits: {max_images: 4, max_image_bytes: 10485760, image_types: [png]}}}",
    )
    client = await make_client(text)
    files = [("image[]", big_png(7 * 1024 * 1024))] * 3
    error = await assert_error(await edit(client, {}, files), 400, "image_too_large", "image")
    assert "JSON body" in error["message"]
    assert fake_bfl.requests == []


@pytest.mark.parametrize(
    "prompt, reason, said", [("a forbidden logo", "Derivative Works", "the prompt or the input images"), ("something explicit", "NSFW", "the generated image")]
)
async def test_moderated_edit_is_400_content_policy_violation(bfl_client, fake_bfl, tmp_path, prompt, reason, said):
    client = await bfl_client(provider="retries: {attempts: 3, backoff: 0.01}")
    error = await assert_error(await edit(client, {"prompt": prompt}), 400, "content_policy_violation", None)
    assert reason in error["message"] and said in error["message"]
    assert len(fake_bfl.requests) == 1  # never submitted again
    [record] = records(tmp_path)
    assert record["cost_usd"] == 0 and record.get("undelivered_billed", 0) == 0  # taken as not billed (see docs)


async def test_edit_billed_per_delivered_image_and_per_accepted_job(bfl_client, fake_bfl, tmp_path):
    # n=3: one job ends in Error after BFL accepted it (billed, not delivered); then n=2 with one
    # submission refused (429: never ran, never billed).
    client = await bfl_client()
    fake_bfl.distinct_images = True
    fake_bfl.poll_cues.append(Cue(body={"id": "job-1", "status": "Error", "details": {"error": "internal"}}))
    body = await images_body(await edit(client, {"n": 3, "response_format": "b64_json"}))
    assert len(body["data"]) == 2 and len(fake_bfl.requests) == 3 and fake_bfl.downloads == 2
    [record] = records(tmp_path)
    assert (record["images"], record["undelivered_billed"]) == (2, 1) and record["cost_usd"] == pytest.approx(3 * 0.04)
    fake_bfl.cues.append(Cue(status=429, body={"detail": "busy"}))
    body = await images_body(await edit(client, {"n": 2, "response_format": "b64_json"}))
    assert len(body["data"]) == 1
    record = records(tmp_path)[-1]
    assert (record["images"], record.get("undelivered_billed", 0)) == (1, 0) and record["cost_usd"] == pytest.approx(0.04)


async def test_edit_that_never_finishes_is_504_billed_and_not_submitted_again(bfl_client, fake_bfl, tmp_path):
    client = await bfl_client(total=0.5, provider="retries: {attempts: 3, backoff: 0.01}")
    fake_bfl.never_ready = True
    resp = await edit(client, {"model": "flux-kontext-max"})
    await assert_error(resp, 504, "upstream_timeout")
    assert resp.headers["x-should-retry"] == "false"
    assert len(fake_bfl.requests) == 1 and len(fake_bfl.polls) >= 1 and fake_bfl.downloads == 0
    [record] = records(tmp_path)
    assert record["undelivered_billed"] == 1 and record["cost_usd"] == pytest.approx(0.08)


async def test_a_body_bfl_finds_too_large_is_400_and_billed_nothing(bfl_client, fake_bfl, tmp_path):
    # Below the gateway's bounds but above BFL's own: the job was refused, so never billed.
    client = await bfl_client(provider="retries: {attempts: 3, backoff: 0.01}")
    fake_bfl.cue(status=413, body={"detail": "Request Entity Too Large"})
    await assert_error(await edit(client), 400, "image_too_large", "image")
    assert len(fake_bfl.requests) == 1
    [record] = records(tmp_path)
    assert record["cost_usd"] == 0 and record.get("undelivered_billed", 0) == 0


async def test_a_retried_edit_sends_the_same_bytes_again(bfl_client, fake_bfl, tmp_path):
    # The first submission is refused (503: never ran); the retry reads the spooled image again.
    client = await bfl_client(provider="retries: {attempts: 2, backoff: 0.01}")
    image = big_png(2 * 1024 * 1024)
    fake_bfl.cue(status=503, body={"detail": "overloaded"})
    await images_body(await edit(client, {"response_format": "b64_json"}, [("image", image)]))
    assert fake_bfl.inputs == [[image], [image]]
    [record] = records(tmp_path)
    assert record["images"] == 1 and record["cost_usd"] == pytest.approx(0.04)
