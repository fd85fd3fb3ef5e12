"""Egress: imgproxy only ever talks to a provider's own hosts, at addresses it may use.

Attacks from a misbehaving upstream (redirects, image URLs elsewhere) and from DNS (a public
name answering with loopback, metadata or private addresses), on real sockets. "Other hosts"
are real servers on 127.0.0.2, or on another port of 127.0.0.1; names are answered by a
stand-in for the system resolver, which the gateway's checking resolver wraps."""

from __future__ import annotations

import base64
import ipaddress
import logging
import socket

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver

from imgproxy import egress
from imgproxy.config import ConfigError
from imgproxy.egress import AddressPolicy, AddressRefused, CheckingResolver, classify
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


class Hosts(AbstractResolver):
    """Answers names from a table, as a DNS server would (unknown names: no such host)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        if host not in self.table:
            raise OSError(socket.EAI_NONAME, f"{host}: no such host")
        return [
            {"hostname": host, "host": ip, "port": port, "family": socket.AF_INET6 if ":" in ip else socket.AF_INET,
             "proto": 0, "flags": socket.AI_NUMERICHOST}
            for ip in self.table[host]
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
def dns(monkeypatch):
    table: dict[str, list[str]] = {}
    monkeypatch.setattr(egress, "system_resolver", lambda: Hosts(table))
    return table


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


@pytest.mark.parametrize("image_hosts", ["", "    image_hosts: ['127.0.0.1']\n"])
async def test_same_host_other_port_is_refused(make_client, config_text, fake_openai, trap_at, caplog, image_hosts):
    trap = await trap_at("127.0.0.1")  # the provider's own host, another port
    client = await make_client(provider_lines(config_text(), "openai", image_hosts))
    fake_openai.cue(body={"created": 1, "data": [{"url": f"{trap.url}/img-0.png?se=2026&sig=SECRET-SIG"}]})
    with caplog.at_level(logging.WARNING):
        resp = await client.post(URL, json=DALLE, headers=AUTH)
        error = await assert_error(resp, 502, "upstream_bad_response")
    assert "not allowed" in error["message"]
    assert trap.requests == []
    assert "'127.0.0.1'" in warnings(caplog) and "SECRET-SIG" not in gateway_log(caplog)


# --- addresses: what a name resolves to is checked --------------------------------------------


def public_name_config(config_text, fake_openai, lines: str = "") -> str:
    """The openai provider configured by a public-looking name (answered by `dns`)."""
    port = fake_openai.base_url.rsplit(":", 1)[1]
    text = config_text().replace(f"base_url: {fake_openai.base_url}/v1", f"base_url: http://api.provider.example:{port}/v1", 1)
    return provider_lines(text, "openai", lines)


@pytest.mark.parametrize("address", ["127.0.0.1", "169.254.169.254", "10.1.2.3", "::ffff:127.0.0.1", "::1", "0.0.0.0"])
async def test_public_name_resolving_to_a_non_public_address_is_refused(make_client, config_text, fake_openai, dns, caplog, address):
    dns["api.provider.example"] = [address]
    client = await make_client(public_name_config(config_text, fake_openai))
    with caplog.at_level(logging.WARNING):
        error = await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 502, "upstream_bad_response")
    assert address not in error["message"]  # the client learns nothing about the network
    assert fake_openai.requests == []
    logged = warnings(caplog)
    assert "refused to connect to provider openai" in logged and "api.provider.example" in logged and address in logged


@pytest.mark.parametrize(
    "setting, allowed",
    [("true", True), ("['127.0.0.0/8']", True), ("['::1/128', '10.0.0.0/8']", False), ("false", False)],
)
async def test_explicit_opt_in_allows_non_public_addresses(make_client, config_text, fake_openai, dns, setting, allowed):
    dns["api.provider.example"] = ["127.0.0.1"]
    client = await make_client(public_name_config(config_text, fake_openai, f"    allow_private_addresses: {setting}\n"))
    resp = await client.post(URL, json={**DALLE, "response_format": "b64_json"}, headers=AUTH)
    if allowed:
        await images_body(resp)
        assert len(fake_openai.requests) == 1
    else:
        await assert_error(resp, 502, "upstream_bad_response")
        assert fake_openai.requests == []


async def test_image_host_name_resolving_to_metadata_is_refused(make_client, config_text, fake_openai, cdn, dns, caplog):
    # The provider may use 127.0.0.0/8 (its own address); its CDN's name answers with the
    # metadata address, a private one, or a mix: only a loopback answer is ever connected to.
    dns.update({"api.provider.example": ["127.0.0.1"], "a.cdn.example": ["169.254.169.254"],
                "b.cdn.example": ["10.0.0.1"], "c.cdn.example": ["169.254.169.254", "127.0.0.1"]})
    lines = f"    allow_private_addresses: ['127.0.0.0/8']\n    image_hosts: ['*.cdn.example:{cdn.port}']\n"
    client = await make_client(public_name_config(config_text, fake_openai, lines).replace(
        "models:\n", "models:\n  url-only: {provider: openai, upstream_model: dall-e-2, capabilities: {upstream_formats: [url]}}\n"))
    for host in ("a.cdn.example", "b.cdn.example"):
        fake_openai.cue(body={"created": 1, "data": [{"url": f"http://{host}:{cdn.port}/ok.png"}]})
        with caplog.at_level(logging.WARNING):
            await assert_error(await client.post(URL, json={**DALLE, "model": "url-only"}, headers=AUTH), 502, "upstream_bad_response")
        assert host in warnings(caplog)
    fake_openai.cue(body={"created": 1, "data": [{"url": f"http://c.cdn.example:{cdn.port}/ok.png"}]})
    body = await images_body(await client.post(URL, json={**DALLE, "model": "url-only"}, headers=AUTH))
    assert await (await download(client, body["data"][0]["url"])).read() == CDN_PNG
    assert "left out addresses of c.cdn.example" in warnings(caplog)


async def test_self_hosted_provider_reaches_private_neighbours_but_not_metadata(make_client, config_text, fake_openai, cdn, dns):
    # base_url is 127.0.0.1: a self-hosted provider, whose image hosts may be loopback or private.
    dns.update({"img1.cdn.internal": ["127.0.0.1"], "meta.cdn.internal": ["169.254.169.254"], "cdn.internal": ["127.0.0.1"]})
    lines = f"    image_hosts: ['*.cdn.internal:{cdn.port}']\n"
    client = await make_client(provider_lines(config_text(), "openai", lines))
    fake_openai.cue(body={"created": 1, "data": [{"url": f"http://img1.cdn.internal:{cdn.port}/ok.png"}]})
    body = await images_body(await client.post(URL, json=DALLE, headers=AUTH))
    assert await (await download(client, body["data"][0]["url"])).read() == CDN_PNG
    # Link-local (cloud metadata) is not a neighbour of a loopback provider; the wildcard
    # does not cover the bare domain.
    for host in ("meta.cdn.internal", "cdn.internal"):
        fake_openai.cue(body={"created": 1, "data": [{"url": f"http://{host}:{cdn.port}/ok.png"}]})
        await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 502, "upstream_bad_response")


async def test_localhost_by_name_is_a_self_hosted_provider(make_client, config_text, fake_openai):
    # Resolved by the real system resolver (/etc/hosts), wrapped by the checking one.
    port = fake_openai.base_url.rsplit(":", 1)[1]
    client = await make_client(config_text().replace(f"base_url: {fake_openai.base_url}/v1", f"base_url: http://localhost:{port}/v1", 1))
    await images_body(await client.post(URL, json={**DALLE, "response_format": "b64_json"}, headers=AUTH))
    assert len(fake_openai.requests) == 1


async def test_image_host_given_as_a_non_public_literal_needs_the_opt_in(make_client, config_text, fake_openai):
    lines = "    image_hosts: ['169.254.169.254', '10.0.0.7']\n"
    client = await make_client(provider_lines(config_text(), "openai", lines))
    fake_openai.cue(body={"created": 1, "data": [{"url": "http://169.254.169.254/latest/meta-data/iam"}]})
    error = await assert_error(await client.post(URL, json=DALLE, headers=AUTH), 502, "upstream_bad_response")
    assert "not allowed" in error["message"]


async def test_resolver_leaves_out_answers_the_policy_refuses():
    table = {"mixed.example": ["169.254.169.254", "127.0.0.1", "192.168.1.1", "93.184.215.14"], "bad.example": ["10.0.0.1", "fe80::1"]}
    resolver = CheckingResolver(AddressPolicy(networks=(ipaddress.ip_network("127.0.0.0/8"),)), inner=Hosts(table))
    answers = await resolver.resolve("mixed.example", 443)
    assert [answer["host"] for answer in answers] == ["127.0.0.1", "93.184.215.14"]
    with pytest.raises(AddressRefused) as refused:
        await resolver.resolve("bad.example", 443)
    assert refused.value.addresses == ["10.0.0.1", "fe80::1"]


@pytest.mark.parametrize(
    "address, kind",
    [
        ("8.8.8.8", "public"), ("2606:4700:4700::1111", "public"),
        ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("::ffff:169.254.169.254", "link-local"),
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.0.1", "private"), ("100.64.0.1", "private"),
        ("fc00::1", "private"), ("fd00:ec2::254", "private"),
        ("0.0.0.0", "never"), ("0.1.2.3", "never"), ("::", "never"), ("224.0.0.1", "never"), ("ff02::1", "never"),
        ("240.0.0.1", "never"),
    ],
)
def test_address_kinds(address, kind):
    assert classify(ipaddress.ip_address(address)) == kind


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, path",
    [
        ("    image_hosts: ['cdn.example.com/images']\n", "providers.openai.image_hosts.0"),
        ("    image_hosts: [ok.example.com, 'bad*.example.com']\n", "providers.openai.image_hosts.1"),
        ("    image_hosts: ['cdn.example.com:99999']\n", "providers.openai.image_hosts.0"),
        ("    image_hosts: ['ftp://cdn.example.com']\n", "providers.openai.image_hosts.0"),
        ("    allow_private_addresses: ['10.0.0.0/8', 'intranet']\n", "providers.openai.allow_private_addresses.1"),
        ("    allow_private_addresses: 'yes'\n", "providers.openai.allow_private_addresses"),
    ],
)
async def test_bad_egress_settings_are_config_errors(make_client, config_text, lines, path):
    with pytest.raises(ConfigError) as caught:
        await make_client(provider_lines(config_text(), "openai", lines))
    assert caught.value.path == path


async def test_base_url_on_an_unconnectable_address_is_a_config_error(make_client, config_text, fake_openai):
    port = fake_openai.base_url.rsplit(":", 1)[1]
    with pytest.raises(ConfigError) as caught:
        await make_client(config_text().replace(f"base_url: {fake_openai.base_url}/v1", f"base_url: http://0.0.0.0:{port}/v1", 1))
    assert caught.value.path == "providers.openai.base_url"
