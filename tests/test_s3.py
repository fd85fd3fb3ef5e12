"""The S3 image store against a real S3 server (SeaweedFS's `weed server -s3`): gateway URLs
streamed from the bucket, presigned URLs served by the bucket itself, two gateways sharing one
bucket, and a store that is down or hangs while a paid-for image is being saved."""

import asyncio
import base64
import hashlib
import hmac
import time
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.conftest import AUTH, assert_error, download, images_body
from tests.fakes import FAKE_PNG
from tests.s3server import BUCKET, SECRET_KEY, free_ports

URL = "/v1/images/generations"
SIGNING_KEY = b"test-signing-key"  # as in tests/conftest.py's config
GPT_URL = {"model": "gpt-image-1", "prompt": "x", "response_format": "url", "output_format": "png"}
def s3_extra(endpoint: str, urls: str = "gateway", prefix: str = "images/", more: str = "") -> str:
    return (
        f"  store: s3\n  s3:\n    bucket: {BUCKET}\n    prefix: {prefix}\n    endpoint_url: {endpoint}\n"
        f"    region: us-east-1\n    urls: {urls}\n{more}"
    )


def parts(url: str) -> tuple[str, int, str]:
    split = urlsplit(url)
    query = parse_qs(split.query)
    return split.path.rsplit("/", 1)[1], int(query["expires"][0]), query["signature"][0]


def name_of_another(name: str) -> str:
    return ("A" if name[0] != "A" else "B") + name[1:]


def signed(client, name: str, expires: int) -> str:
    signature = hmac.new(SIGNING_KEY, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()
    return str(client.make_url(f"/v1/images/files/{name}?expires={expires}&signature={signature}"))


async def test_gateway_urls_stream_the_object_from_the_bucket(make_client, s3_env):
    endpoint, bucket = s3_env
    client = await make_client(extra=s3_extra(endpoint, prefix="gw/"))
    assert (await client.get("/readyz")).status == 200
    body = await images_body(await client.post(URL, json=GPT_URL, headers=AUTH))
    url = body["data"][0]["url"]
    name, expires, signature = parts(url)
    # It is in the bucket, under the prefix, with its type.
    stored = bucket.get_object(Bucket=BUCKET, Key=f"gw/{name}")
    assert stored["Body"].read() == FAKE_PNG and stored["ContentType"] == "image/png"
    image = await download(client, url)
    assert image.status == 200 and image.headers["Content-Type"] == "image/png" and await image.read() == FAKE_PNG
    # Tampering: another expiry, another signature, another name.
    other = name_of_another(name)
    bucket.put_object(Bucket=BUCKET, Key=f"gw/{other}", Body=b"another image")
    for bad in (url.replace(f"expires={expires}", f"expires={expires + 60}"), url.replace(signature, "0" * 64), url.replace(name, other)):
        await assert_error(await download(client, bad), 403, "invalid_signature")
    # Expired: refused although the bucket still holds the object.
    await assert_error(await download(client, signed(client, name, int(time.time()) - 1)), 410, "url_expired")
    assert bucket.head_object(Bucket=BUCKET, Key=f"gw/{name}")["ContentLength"] == len(FAKE_PNG)
    # Gone from the bucket (the lifecycle rule took it): 410, not a 500.
    bucket.delete_object(Bucket=BUCKET, Key=f"gw/{name}")
    await assert_error(await download(client, url), 410, "image_gone")


async def test_presigned_urls_are_served_by_the_bucket_itself(make_client, s3_env):
    endpoint, _ = s3_env
    client = await make_client(extra=s3_extra(endpoint, urls="presigned") + "  url_ttl: 600\n")
    body = await images_body(await client.post(URL, json=GPT_URL, headers=AUTH))
    url = body["data"][0]["url"]
    assert url.startswith(f"{endpoint}/{BUCKET}/images/") and "X-Amz-Expires=600" in url
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200 and await resp.read() == FAKE_PNG
        # The bucket checks its own signature: a tampered URL is refused by S3, not by us.
        async with session.get(url.replace("X-Amz-Expires=600", "X-Amz-Expires=6000")) as resp:
            assert resp.status == 403


async def test_a_url_minted_by_one_gateway_is_served_by_another(aiohttp_client, config_text, s3_env):
    endpoint, _ = s3_env
    text = config_text(s3_extra(endpoint))
    first = await aiohttp_client(create_app(await Gateway.load(text=text, env={})))
    second = await aiohttp_client(create_app(await Gateway.load(text=text, env={})))
    body = await images_body(await first.post(URL, json=GPT_URL, headers=AUTH))
    path = urlsplit(body["data"][0]["url"])
    resp = await second.get(f"{path.path}?{path.query}")
    assert resp.status == 200 and await resp.read() == FAKE_PNG


async def test_a_shared_store_without_a_signing_key_is_a_start_up_error(config_text, s3_env):
    endpoint, _ = s3_env
    text = config_text(s3_extra(endpoint)).replace("  signing_key: test-signing-key\n", "  signing_key: ${IMGPROXY_SIGNING_KEY:-}\n")
    with pytest.raises(ConfigError) as error:
        await Gateway.load(text=text, env={})
    assert error.value.path == "images.signing_key" and "IMGPROXY_SIGNING_KEY" in error.value.problem
    # Set, it starts; presigned URLs do not use the key, so they do not need it.
    assert (await Gateway.load(text=text, env={"IMGPROXY_SIGNING_KEY": "k" * 32})).config.images.signing_key
    assert await Gateway.load(text=config_text(s3_extra(endpoint, urls="presigned")).replace("  signing_key: test-signing-key\n", ""), env={})


async def test_credentials_are_never_read_from_the_config(config_text, s3_env):
    endpoint, _ = s3_env
    for key in ("aws_access_key_id", "aws_secret_access_key", "access_key", "secret_key"):
        with pytest.raises(ConfigError) as error:
            await Gateway.load(text=config_text(s3_extra(endpoint, more=f"    {key}: AKIAEXAMPLE\n")), env={})
        assert error.value.path == f"images.s3.{key}" and "unknown key" in error.value.problem


async def blackhole(aiohttp_server):
    """An S3 endpoint that accepts the request and never answers."""
    async def hang(request):
        await asyncio.sleep(3600)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")


@pytest.mark.parametrize("down", ["refusing", "hanging"])
async def test_a_store_that_is_down_never_loses_the_image(make_client, s3_env, aiohttp_server, fake_openai, down):
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}" if down == "refusing" else await blackhole(aiohttp_server)
    client = await make_client(extra=s3_extra(endpoint, more="  store_timeout: 1\n"))
    assert (await client.get("/readyz")).status == 503
    calls = len(fake_openai.requests)
    resp = await client.post(URL, json=GPT_URL, headers=AUTH)
    body = await images_body(resp)
    assert resp.headers["x-imgproxy-image-fallback"] == "store_unavailable"
    assert base64.b64decode(body["data"][0]["b64_json"]) == FAKE_PNG and "url" not in body["data"][0]
    assert len(fake_openai.requests) == calls + 1  # the provider was called (and paid) once
    samples = client.gateway.metrics.registry.get_sample_value
    assert samples("imgproxy_image_store_operations_total", {"operation": "put", "result": "error"}) >= 1
    # Configured to refuse instead: a clear 503, still one provider call.
    client = await make_client(extra=s3_extra(endpoint, more="  store_timeout: 1\n  on_store_failure: error\n"))
    await assert_error(await client.post(URL, json=GPT_URL, headers=AUTH), 503, "image_store_unavailable")
    assert len(fake_openai.requests) == calls + 2


async def relay(aiohttp_server, session, endpoint: str, misbehave):
    """A proxy in front of the real bucket; `misbehave(request, body)` may answer instead
    (returning a response) or let the request through (returning None)."""
    async def handle(request):
        body = await request.read()
        answer = await misbehave(request, body)
        if answer is not None:
            return answer
        headers = {k: v for k, v in request.headers.items() if k.lower() != "transfer-encoding"}
        async with session.request(request.method, endpoint + request.path_qs, headers=headers, data=body, allow_redirects=False) as upstream:
            hop = ("transfer-encoding", "connection", "content-encoding")
            return web.Response(status=upstream.status, body=await upstream.read(),
                                headers={k: v for k, v in upstream.headers.items() if k.lower() not in hop})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")


async def test_a_store_that_fails_once_is_retried_within_the_deadline(make_client, s3_env, aiohttp_server):
    """The first upload is answered 503 SlowDown, then uploads go through: the image ends up
    in the bucket, behind a URL, without a fallback."""
    endpoint, bucket = s3_env
    failed = []

    async def slow_down_once(request, body):
        if request.method == "PUT" and not failed:
            failed.append(request.path)
            return web.Response(status=503, content_type="application/xml", text="<Error><Code>SlowDown</Code><Message>busy</Message></Error>")

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        proxy = await relay(aiohttp_server, session, endpoint, slow_down_once)
        client = await make_client(extra=s3_extra(proxy, prefix="retry/"))
        resp = await client.post(URL, json=GPT_URL, headers=AUTH)
        body = await images_body(resp)
        assert "x-imgproxy-image-fallback" not in resp.headers and failed
        name, _, _ = parts(body["data"][0]["url"])
        assert bucket.get_object(Bucket=BUCKET, Key=f"retry/{name}")["Body"].read() == FAKE_PNG
        assert await (await download(client, body["data"][0]["url"])).read() == FAKE_PNG


async def test_a_store_that_breaks_mid_upload_after_passing_readiness(make_client, s3_env, aiohttp_server, fake_openai):
    """Readiness is fine, then every upload has its connection cut after the body was sent."""
    endpoint, bucket = s3_env
    cut = []

    async def cut_uploads(request, body):
        if request.method == "PUT":
            cut.append(request.path)
            request.transport.close()
            return web.Response(status=500)  # never reaches the client

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        proxy = await relay(aiohttp_server, session, endpoint, cut_uploads)
        client = await make_client(extra=s3_extra(proxy, prefix="cutup/", more="  store_timeout: 1\n"))
        assert (await client.get("/readyz")).status == 200
        calls = len(fake_openai.requests)
        resp = await client.post(URL, json=GPT_URL, headers=AUTH)
        body = await images_body(resp)
        assert resp.headers["x-imgproxy-image-fallback"] == "store_unavailable"
        assert base64.b64decode(body["data"][0]["b64_json"]) == FAKE_PNG
        assert len(cut) >= 2 and len(set(cut)) == 1  # retried, always under the same name
        assert len(fake_openai.requests) == calls + 1


async def test_serving_while_the_store_is_down_is_a_503(make_client, s3_env):
    client = await make_client(extra=s3_extra(f"http://127.0.0.1:{free_ports(1)[0]}"))
    url = signed(client, "A" * 24 + ".png", int(time.time()) + 60)
    await assert_error(await download(client, url), 503, "image_store_unavailable")


async def test_a_store_failing_mid_image_never_passes_for_a_whole_image(make_client, s3_env, aiohttp_server, caplog):
    endpoint, _ = s3_env

    async def cut_downloads(request, body):
        if request.method == "GET" and "/cut/" in request.path:
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            response.content_length = 1000
            await response.prepare(request)
            await response.write(b"\x89PNG half an image")
            request.transport.close()
            return response

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        proxy = await relay(aiohttp_server, session, endpoint, cut_downloads)
        client = await make_client(extra=s3_extra(proxy, prefix="cut/"))
        url = (await images_body(await client.post(URL, json=GPT_URL, headers=AUTH)))["data"][0]["url"]
        resp = await download(client, url)
        assert resp.status == 200 and resp.content_length == 1000
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert "image store failed while serving an image" in caplog.text


async def test_the_s3_secret_never_reaches_the_logs(all_log_output):
    # Runs after the tests above in this module (pytest keeps file order).
    assert all_log_output and SECRET_KEY not in "\n".join(all_log_output)
