"""Egress: imgproxy only ever talks to a provider's own hosts.

Attacks from a misbehaving upstream (redirects), on real sockets. "Other hosts" are real
servers on 127.0.0.2."""

from __future__ import annotations

import base64
import logging

import pytest
from aiohttp import web

from tests.conftest import AUTH, assert_error, download, images_body
from tests.fakes import Cue, tiny_png

URL = "/v1/images/generations"
DALLE = {"model": "dall-e-2", "prompt": "a lighthouse"}
CDN_PNG = tiny_png(rgb=b"\x01\x02\x03")
EVIL = b"\x89PNG\r\n\x1a\nbytes from a host the provider does not own"


class Trap:
    """A server nobody should ever reach: records every request, answers with EVIL bytes."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.url = ""

    def app(self) -> web.Application:
        async def anything(request: web.Request) -> web.Response:
            self.requests.append(f"{request.method} {request.path_qs} {await request.read()!r}")
            return web.Response(body=EVIL, content_type="image/png")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        return app


@pytest.fixture
def trap_at(aiohttp_server):
    async def make(host: str) -> Trap:
        trap = Trap()
        server = await aiohttp_server(trap.app(), host=host)
        trap.url = str(server.make_url("")).rstrip("/")
        return trap

    return make


@pytest.fixture
async def cdn(aiohttp_server):
    """An image host a provider may use: serves one image, and redirects on cue."""

    class Cdn:
        redirect_to = ""
        url = ""
        port = 0

    async def image(request: web.Request) -> web.Response:
        if request.match_info["name"] == "moved.png":
            raise web.HTTPFound(Cdn.redirect_to)
        return web.Response(body=CDN_PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}", image)
    server = await aiohttp_server(app)
    Cdn.url, Cdn.port = str(server.make_url("")).rstrip("/"), server.port
    return Cdn


def provider_lines(config: str, name: str, lines: str) -> str:
    """The config with `lines` added to provider `name`."""
    return config.replace(f"  {name}:\n    type: {name}\n", f"  {name}:\n    type: {name}\n{lines}", 1)


def warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def gateway_log(caplog) -> str:
    """What imgproxy logged (the test's own servers log their access lines too)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("imgproxy"))


# --- redirects are never followed -----------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_generation_redirect_is_not_followed(client, fake_openai, trap_at, caplog, status):
    trap = await trap_at("127.0.0.2")
    fake_openai.cue(status=status, body={}, headers={"Location": f"{trap.url}/v1/images/generations"})
    with caplog.at_level(logging.WARNING):
        resp = await client.post(URL, json={**DALLE, "prompt": "a secret prompt"}, headers=AUTH)
        await assert_error(resp, 502, "upstream_bad_response")
    assert trap.requests == []  # the prompt never went to the host the upstream named
    assert len(fake_openai.requests) == 1  # nor was the generation asked for twice
    assert "127.0.0.2" in warnings(caplog) and "redirect" in warnings(caplog)


async def test_stability_redirect_is_not_followed(client, fake_stability, trap_at):
    trap = await trap_at("127.0.0.2")
    fake_stability.cue(status=307, body={}, headers={"Location": f"{trap.url}/v1/generation/x/text-to-image"})
    resp = await client.post(URL, json={"model": "sdxl", "prompt": "a lighthouse"}, headers=AUTH)
    await assert_error(resp, 502, "upstream_bad_response")
    assert trap.requests == [] and len(fake_stability.requests) == 1


async def test_moderation_redirect_is_not_followed(make_client, config_text, fake_openai, trap_at):
    trap = await trap_at("127.0.0.2")
    client = await make_client(config_text(extra="moderation:\n  upstream: {provider: openai, timeout: 2}\n"))
    fake_openai.moderation_cues.append(Cue(status=307, body={}, headers={"Location": f"{trap.url}/v1/moderations"}))
    body = {"model": "placeholder", "prompt": "a secret prompt", "response_format": "b64_json"}
    await assert_error(await client.post(URL, json=body, headers=AUTH), 503, "moderation_unavailable")
    assert trap.requests == []


async def test_image_redirect_from_an_allowed_host_is_not_followed(make_client, config_text, fake_openai, cdn, trap_at, caplog):
    trap = await trap_at("127.0.0.2")
    # A model whose upstream answers only with URLs, so that both formats fetch the image.
    model = "  url-only: {provider: openai, upstream_model: dall-e-2, capabilities: {upstream_formats: [url]}}\n"
    text = provider_lines(config_text(), "openai", f"    image_hosts: ['127.0.0.1:{cdn.port}']\n").replace("models:\n", "models:\n" + model)
    client = await make_client(text)
    # The CDN is allowed: its image is re-hosted.
    fake_openai.cue(body={"created": 1, "data": [{"url": f"{cdn.url}/ok.png?sig=SECRET-SIG"}]})
    body = await images_body(await client.post(URL, json={**DALLE, "model": "url-only"}, headers=AUTH))
    assert await (await download(client, body["data"][0]["url"])).read() == CDN_PNG
    # It redirects to another host: that host's bytes never reach the client, in either format.
    cdn.redirect_to = f"{trap.url}/evil.png"
    for response_format in ("url", "b64_json"):
        fake_openai.cue(body={"created": 1, "data": [{"url": f"{cdn.url}/moved.png?sig=SECRET-SIG"}]})
        with caplog.at_level(logging.WARNING):
            resp = await client.post(URL, json={**DALLE, "model": "url-only", "response_format": response_format}, headers=AUTH)
            await assert_error(resp, 502, "upstream_bad_response")
        assert base64.b64encode(EVIL).decode() not in await resp.text()
    assert trap.requests == []
    assert "127.0.0.2" in warnings(caplog) and "SECRET-SIG" not in gateway_log(caplog)  # the host, never the query
