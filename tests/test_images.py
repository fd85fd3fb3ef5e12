"""Image hosting: signed expiring URLs, conversions between url and b64_json, the sweep."""

import base64
import hashlib
import hmac
import os
import time
from urllib.parse import parse_qs, urlsplit

from tests.conftest import AUTH, assert_error, download, images_body
from tests.fakes import FAKE_B64, FAKE_PNG, png_size

URL = "/v1/images/generations"
SIGNING_KEY = b"test-signing-key"  # as in tests/conftest.py's config


def parts(url: str) -> tuple[str, int, str]:
    split = urlsplit(url)
    query = parse_qs(split.query)
    return split.path.rsplit("/", 1)[1], int(query["expires"][0]), query["signature"][0]


def signed(client, name: str, expires: int) -> str:
    signature = hmac.new(SIGNING_KEY, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()
    return str(client.make_url(f"/v1/images/files/{name}?expires={expires}&signature={signature}"))


async def test_base64_only_provider_gets_a_hosted_url(client):
    resp = await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "response_format": "url", "output_format": "png"}, headers=AUTH)
    body = await images_body(resp)
    url = body["data"][0]["url"]
    assert "b64_json" not in body["data"][0]
    assert body["usage"]["total_tokens"] == 100 and body["output_format"] == "png"
    name, expires, signature = parts(url)
    assert 3590 <= expires - time.time() <= 3600  # one hour by default
    # The signature is an HMAC-SHA256 of name and expiry under the configured key.
    assert signature == hmac.new(SIGNING_KEY, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()
    image = await download(client, url)
    assert image.status == 200 and image.headers["Content-Type"] == "image/png"
    assert await image.read() == FAKE_PNG


async def test_gpt_image_defaults_to_base64_like_openai(client, fake_openai):
    body = await images_body(await client.post(URL, json={"model": "gpt-image-1", "prompt": "x"}, headers=AUTH))
    assert body["data"][0]["b64_json"] == FAKE_B64
    assert "response_format" not in fake_openai.requests[-1]  # GPT image models refuse it upstream


async def test_placeholder_makes_real_deterministic_pngs(client):
    body = {"model": "placeholder", "prompt": "a red bicycle", "size": "512x512", "n": 2, "response_format": "b64_json"}
    first = await images_body(await client.post(URL, json=body, headers=AUTH))
    again = await images_body(await client.post(URL, json=body, headers=AUTH))
    pngs = [base64.b64decode(item["b64_json"]) for item in first["data"]]
    assert [png_size(png) for png in pngs] == [(512, 512), (512, 512)]
    assert pngs[0] != pngs[1]  # each image of n differs
    assert [item["b64_json"] for item in again["data"]] == [item["b64_json"] for item in first["data"]]
    other = await images_body(await client.post(URL, json={**body, "prompt": "a blue bicycle"}, headers=AUTH))
    assert other["data"][0]["b64_json"] != first["data"][0]["b64_json"]
    custom = await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "x", "size": "640x360"}, headers=AUTH))
    assert png_size(await (await download(client, custom["data"][0]["url"])).read()) == (640, 360)


async def test_tampered_url_is_403(client):
    body = await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH))
    name, expires, signature = parts(body["data"][0]["url"])
    for url in (
        str(client.make_url(f"/v1/images/files/{name}?expires={expires + 3600}&signature={signature}")),
        str(client.make_url(f"/v1/images/files/{name}?expires={expires}&signature={'0' * 64}")),
        str(client.make_url(f"/v1/images/files/{name}?expires=soon&signature={signature}")),
        str(client.make_url(f"/v1/images/files/{name}")),
    ):
        await assert_error(await download(client, url), 403, "invalid_signature")


async def test_expired_url_is_410(client):
    body = await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH))
    name, _, _ = parts(body["data"][0]["url"])
    await assert_error(await download(client, signed(client, name, int(time.time()) - 1)), 410, "url_expired")
    assert (await download(client, signed(client, name, int(time.time()) + 60))).status == 200


async def test_sweep_deletes_expired_images(client, tmp_path):
    body = await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH))
    name, expires, _ = parts(body["data"][0]["url"])
    path = tmp_path / "images" / name
    assert path.is_file()
    assert client.gateway.store.sweep() == 0
    os.utime(path, (time.time() - 3601, time.time() - 3601))
    assert client.gateway.store.sweep() == 1
    assert not path.exists()
    await assert_error(await download(client, signed(client, name, expires)), 410, "image_gone")


async def test_path_traversal_names_are_refused(client, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"secret")
    expires = int(time.time()) + 60
    for name in ("../secret.png", "short.png", "aaaaaaaaaaaaaaaaaaaa.exe"):
        signature = hmac.new(SIGNING_KEY, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()
        encoded = name.replace("/", "%2F")
        resp = await client.get(f"/v1/images/files/{encoded}?expires={expires}&signature={signature}")
        await assert_error(resp, 410, "image_gone")


async def test_public_base_url(make_client):
    client = await make_client(extra="  public_base_url: https://img.example.com/")
    body = await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH))
    assert body["data"][0]["url"].startswith("https://img.example.com/v1/images/files/")


async def test_upstream_urls_passthrough(make_client, fake_openai):
    client = await make_client(extra="  upstream_urls: passthrough")
    body = await images_body(await client.post(URL, json={"model": "dall-e-2", "prompt": "x", "n": 2}, headers=AUTH))
    assert [item["url"] for item in body["data"]] == [f"{fake_openai.base_url}/files/img-{i}.png?se=2026" for i in range(2)]
    assert fake_openai.requests[-1]["response_format"] == "url"


async def test_rehost_asks_upstream_for_base64(client, fake_openai):
    body = await images_body(await client.post(URL, json={"model": "dall-e-2", "prompt": "x"}, headers=AUTH))
    assert fake_openai.requests[-1]["response_format"] == "b64_json"
    assert body["data"][0]["url"].startswith(str(client.make_url("/v1/images/files/")))


async def test_hosted_images_are_decoded_as_they_arrive(client, fake_openai):
    # Large enough to arrive in many reads; every image comes back byte for byte.
    image = os.urandom(700_000)
    fake_openai.image_b64 = base64.b64encode(image).decode()
    body = await images_body(await client.post(URL, json={"model": "dall-e-3", "prompt": "x", "n": 1}, headers=AUTH))
    assert body["data"][0]["revised_prompt"] == "Revised: x" and "b64_json" not in body["data"][0]
    assert await (await download(client, body["data"][0]["url"])).read() == image
    body = await images_body(await client.post(URL, json={"model": "dall-e-2", "prompt": "x", "n": 3}, headers=AUTH))
    assert len({item["url"] for item in body["data"]}) == 3
    for item in body["data"]:
        assert await (await download(client, item["url"])).read() == image


async def test_upstream_url_is_fetched_when_client_wants_base64(make_client, config_text, fake_openai):
    # An OpenAI-compatible upstream that only answers with URLs.
    model = "  url-only: {provider: openai, upstream_model: dall-e-2, capabilities: {upstream_formats: [url]}}\n"
    client = await make_client(config_text().replace("models:\n", "models:\n" + model))
    resp = await client.post(URL, json={"model": "url-only", "prompt": "x", "response_format": "b64_json"}, headers=AUTH)
    body = await images_body(resp)
    assert base64.b64decode(body["data"][0]["b64_json"]) == FAKE_PNG
    assert "response_format" not in fake_openai.requests[-1]
    # And re-hosted when the client wants a URL.
    body = await images_body(await client.post(URL, json={"model": "url-only", "prompt": "x"}, headers=AUTH))
    assert not body["data"][0]["url"].startswith(fake_openai.base_url)
    assert await (await download(client, body["data"][0]["url"])).read() == FAKE_PNG


async def test_image_urls_only_from_the_providers_own_hosts(make_client, fake_openai):
    client = await make_client(extra="  upstream_urls: rehost")
    fake_openai.cue(body={"created": 1, "data": [{"url": "http://169.254.169.254/latest/meta-data.png"}]})
    resp = await client.post(URL, json={"model": "dall-e-2", "prompt": "x"}, headers=AUTH)
    error = await assert_error(resp, 502, "upstream_bad_response")
    assert "not allowed" in error["message"]


async def test_invalid_base64_from_upstream_is_502(client, fake_openai):
    fake_openai.cue(body={"created": 1, "data": [{"b64_json": "%%%not-base64%%%"}]})
    resp = await client.post(URL, json={"model": "dall-e-2", "prompt": "x"}, headers=AUTH)
    await assert_error(resp, 502, "upstream_bad_response")
