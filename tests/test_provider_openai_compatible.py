"""The openai_compatible adapter over real sockets: another imgproxy as the upstream (itself in
front of FakeOpenAI), and a host that takes its key bare in X-Api-Key and fails on cue."""

import json

import aiohttp

import pytest

from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, CLIENT_KEY, assert_each_image_is, assert_error, images_body, serve_fake
from tests.fakes import FAKE_PNG, FakeUpstream, tiny_png
from tests.fakes_v2 import FakeCompatibleHost

URL = "/v1/images/generations"


@pytest.fixture
async def fake_host(aiohttp_server):
    async for fake in serve_fake(aiohttp_server, FakeCompatibleHost()):
        yield fake


@pytest.fixture
async def second_gateway(aiohttp_server, fake_openai, tmp_path):
    """Another imgproxy in front of FakeOpenAI; its client key is FakeUpstream.key, so the
    session's leak scan watches for it."""
    text = f"""
auth:
  keys:
    - {{name: first-gateway, key: {FakeUpstream.key}}}
providers:
  openai: {{type: openai, base_url: {fake_openai.base_url}/v1, api_key: {FakeUpstream.key}}}
models:
  dall-e-2: {{provider: openai}}
  dall-e-3: {{provider: openai}}
images:
  directory: {tmp_path / "second-images"}
  signing_key: second-signing-key
"""
    gateway = await Gateway.load(text=text, env={})
    server = await aiohttp_server(create_app(gateway))
    return str(server.make_url("")).rstrip("/")


def config(gateway_url: str, host_url: str, tmp_path, api_key: str = FakeUpstream.key, key_header: str = "X-Api-Key") -> str:
    return f"""
auth:
  keys:
    - {{name: team-a, key: {CLIENT_KEY}}}
providers:
  imgproxy2:
    type: openai_compatible
    base_url: {gateway_url}/v1
    api_key: {api_key}
  host:
    type: openai_compatible
    base_url: {host_url}/v1
    api_key: {FakeUpstream.key}
    timeouts: {{connect: 2, total: 1}}
    options: {{key_header: {key_header}, key_prefix: ""}}
models:
  dall-e-2: {{provider: imgproxy2}}
  dall-e-3: {{provider: imgproxy2}}
  flux:
    provider: host
    upstream_model: black-forest-labs/FLUX.1-schnell
    capabilities:
      sizes: ["1024x1024", "512x512"]
      default_size: "1024x1024"
      max_n: 4
      max_prompt_length: 4000
      upstream_formats: [url, b64_json]
  plain: {{provider: host, upstream_model: some/model}}
images:
  directory: {tmp_path / "images"}
  signing_key: test-signing-key
cost:
  usage_log: {tmp_path / "usage.jsonl"}
  prices:
    flux: {{per_image: {{"*": {{"*": 0.003}}}}}}
    plain: {{per_image: {{"*": {{"*": 0.002}}}}}}
"""


@pytest.fixture
def compat_client(aiohttp_client, second_gateway, fake_host, tmp_path):
    async def make(**kwargs):
        gateway = await Gateway.load(text=config(second_gateway, fake_host.base_url, tmp_path, **kwargs), env={})
        return await aiohttp_client(create_app(gateway))

    return make


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
@pytest.mark.parametrize("model", ["dall-e-2", "flux"])
async def test_reference_example(compat_client, fake_openai, fake_host, model, response_format):
    client = await compat_client()
    body = {"model": model, "prompt": "A cute baby sea otter", "n": 2, "size": "512x512", "response_format": response_format}
    answer = await images_body(await client.post(URL, json=body, headers=AUTH))
    assert len(answer["data"]) == 2
    await assert_each_image_is(client, answer, response_format, FAKE_PNG)
    fake = fake_openai if model == "dall-e-2" else fake_host
    (sent,) = fake.requests
    upstream = "dall-e-2" if model == "dall-e-2" else "black-forest-labs/FLUX.1-schnell"
    assert (sent["model"], sent["n"], sent["size"], sent["prompt"]) == (upstream, 2, "512x512", "A cute baby sea otter")


async def test_openai_sdk_through_two_gateways(compat_client, fake_openai, sdk_for):
    sdk = sdk_for(await compat_client())
    result = await sdk.images.generate(model="dall-e-3", prompt="a lighthouse", quality="hd", style="natural", size="1792x1024")
    assert result.data[0].revised_prompt == "Revised: a lighthouse"
    (sent,) = fake_openai.requests
    assert (sent["quality"], sent["style"], sent["size"]) == ("hd", "natural", "1792x1024")


async def test_key_goes_in_the_configured_header(compat_client, fake_host):
    client = await compat_client()
    await images_body(await client.post(URL, json={"model": "flux", "prompt": "x"}, headers=AUTH))
    assert fake_host.headers[0]["X-Api-Key"] == FakeUpstream.key and "Authorization" not in fake_host.headers[0]
    # The host wants X-Api-Key: a key sent elsewhere is refused, which is the operator's problem.
    wrong = await compat_client(key_header="X-Other-Key")
    await assert_error(await wrong.post(URL, json={"model": "flux", "prompt": "x"}, headers=AUTH), 502, "upstream_auth_failed")


@pytest.mark.parametrize(
    "body, code, param",
    [
        ({"model": "dall-e-2", "prompt": "x", "quality": "hd"}, "invalid_quality", "quality"),
        ({"model": "flux", "prompt": "x", "size": "1792x1024"}, "invalid_size", "size"),
        ({"model": "flux", "prompt": "x", "n": 5}, "invalid_n", "n"),
        ({"model": "flux", "prompt": "x", "background": "transparent"}, "unsupported_parameter", "background"),
        # No capabilities given: the conservative GENERIC set.
        ({"model": "plain", "prompt": "x", "n": 2}, "invalid_n", "n"),
        ({"model": "plain", "prompt": "x", "size": "512x512"}, "invalid_size", "size"),
    ],
)
async def test_parameters_refused(compat_client, fake_openai, fake_host, body, code, param):
    client = await compat_client()
    await assert_error(await client.post(URL, json=body, headers=AUTH), 400, code, param)
    assert fake_openai.requests == [] and fake_host.requests == []


async def test_content_policy_violation_through_the_second_gateway(compat_client):
    client = await compat_client()
    error = await assert_error(await client.post(URL, json={"model": "dall-e-3", "prompt": "forbidden"}, headers=AUTH), 400, "content_policy_violation")
    assert "safety system" in error["message"]


async def test_rejected_key_is_502(compat_client):
    client = await compat_client(api_key="sk-not-the-second-gateways-key")
    await assert_error(await client.post(URL, json={"model": "dall-e-2", "prompt": "x"}, headers=AUTH), 502, "upstream_auth_failed")


@pytest.mark.parametrize(
    "cue, status, code",
    [
        ({"status": 500, "body": {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}}, 502, "upstream_error"),
        ({"status": 502, "body": b"<html>Bad gateway</html>", "content_type": "text/html"}, 502, "upstream_error"),
        ({"status": 200, "body": b"garbage", "content_type": "application/json"}, 502, "upstream_bad_response"),
        ({"status": 200, "cut": True}, 502, "upstream_bad_response"),
        ({"delay": 3}, 504, "upstream_timeout"),
    ],
)
async def test_failures(compat_client, fake_host, tmp_path, cue, status, code):
    client = await compat_client()
    fake_host.cue(**cue)
    await assert_error(await client.post(URL, json={"model": "flux", "prompt": "x", "response_format": "url"}, headers=AUTH), status, code)
    await client.close()
    assert records(tmp_path)[0]["cost_usd"] == 0.0


async def test_usage_record_costs_what_was_delivered(compat_client, tmp_path):
    client = await compat_client()
    await images_body(await client.post(URL, json={"model": "flux", "prompt": "x", "n": 3}, headers=AUTH))
    await images_body(await client.post(URL, json={"model": "dall-e-2", "prompt": "x", "n": 2, "size": "256x256"}, headers=AUTH))
    await client.close()
    assert [(r["model"], r["images"], r["cost_usd"]) for r in records(tmp_path)] == [("flux", 3, 0.009), ("dall-e-2", 2, 0.032)]


@pytest.mark.parametrize("options", ['{key_header: "X-Key\\r\\nX-Injected: 1"}', '{key_header: "Bad Header"}', '{key_prefix: "Bearer\\n"}'])
async def test_a_key_header_that_would_split_the_request_is_a_config_error(options):
    text = f"""
providers:
  host: {{type: openai_compatible, base_url: "https://images.example/v1", api_key: k, options: {options}}}
models:
  m: {{provider: host}}
"""
    with pytest.raises(ConfigError) as caught:
        await Gateway.load(text=text, env={})
    assert caught.value.path == "providers.host.options." + options[1:].split(":")[0]


async def test_edits_and_variations_through_two_gateways_arrive_byte_for_byte(compat_client, fake_openai, sdk_for):
    # The first gateway's upstream form is the second gateway's input: each reads what the other writes.
    sdk = sdk_for(await compat_client())
    image, mask = tiny_png(16, 16, b"\x09\x08\x07"), tiny_png(16, 16, b"\x00\x00\x00")
    edited = await sdk.images.edit(model="dall-e-2", image=("a.png", image, "image/png"), mask=("m.png", mask, "image/png"), prompt="a hat", response_format="b64_json")
    varied = await sdk.images.create_variation(model="dall-e-2", image=("a.png", image, "image/png"), n=2, response_format="b64_json")
    assert len(edited.data) == 1 and len(varied.data) == 2
    assert [[(name, data) for name, _, data in files] for files in fake_openai.uploads] == [[("image", image), ("mask", mask)], [("image", image)]]
    assert fake_openai.requests[0]["prompt"] == "a hat" and "prompt" not in fake_openai.requests[1]


async def test_a_model_of_a_host_without_edits_capabilities_refuses_edits(compat_client, fake_host):
    client = await compat_client()
    form = aiohttp.FormData()
    form.add_field("model", "flux")
    form.add_field("prompt", "p")
    form.add_field("image", tiny_png(), filename="a.png", content_type="image/png")
    await assert_error(await client.post("/v1/images/edits", data=form, headers=AUTH), 400, "unsupported_operation", "model")
    assert fake_host.requests == []
