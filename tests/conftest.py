from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import aiohttp
import httpx2
import openai
import pytest
from aiohttp import ClientResponse, StreamReader
from aiohttp.test_utils import TestClient

from imgproxy.logs import JsonFormatter, access_log

from imgproxy.gateway import Gateway
from imgproxy.server import create_app
from tests.fakes import FakeOpenAI, FakeStability, FakeUpstream, openai_validator
from tests.fakes_google import SECRETS as GOOGLE_SECRETS
from tests.s3server import s3_env, s3_server  # noqa: F401 (fixtures)

CLIENT_KEY = "sk-client-test-key-0001"
# A secret given to config tests through the environment (too short for a client key on purpose).
SECRET_ENV_VALUE = "s3cr3t7"  # shorter than a client key may be
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}

IMAGES_RESPONSE = openai_validator("ImagesResponse")
ERROR_RESPONSE = openai_validator("ErrorResponse")


def gateway_config(openai_url: str, stability_url: str, image_dir: str, extra: str = "", total_timeout: float = 5) -> str:
    return f"""
auth:
  keys:
    - name: team-a
      key: {CLIENT_KEY}
providers:
  openai:
    type: openai
    base_url: {openai_url}/v1
    api_key: {FakeUpstream.key}
    timeouts: {{connect: 2, total: {total_timeout}}}
  stability:
    type: stability
    base_url: {stability_url}
    api_key: {FakeUpstream.key}
  placeholder:
    type: placeholder
models:
  dall-e-2: {{provider: openai}}
  dall-e-3: {{provider: openai}}
  gpt-image-1: {{provider: openai}}
  stable-diffusion-xl-1024-v1-0: {{provider: stability, aliases: [sdxl]}}
  placeholder: {{provider: placeholder}}
images:
  directory: {image_dir}
  signing_key: test-signing-key
{extra}
"""


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class _Lines(io.StringIO):
    """A stream that keeps each line written to it."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def write(self, text: str) -> int:
        self.lines.extend(text.splitlines())
        return len(text)


_SESSION_LOG: list[str] = []
# Where a key reached a test's client: (url, which key), from every gateway response read.
_SESSION_LEAKS: list[tuple[str, str]] = []


def _leak_forms(key: str) -> set[str]:
    return {key, key.lower(), key.upper(), quote(key, safe="")}


def secret_forms() -> dict[str, str]:
    """Every form of every secret the session watches for, mapped to the secret's label."""
    keys = {"FakeUpstream.key": FakeUpstream.key, "CLIENT_KEY": CLIENT_KEY, "SECRET_ENV_VALUE": SECRET_ENV_VALUE, **GOOGLE_SECRETS}
    return {form: label for label, key in keys.items() for form in _leak_forms(key)}


# Per body reader being scanned: the response's URL and the last bytes seen (a key may
# straddle two chunks). Keyed by id: StreamReader has __slots__ and no room for them.
_SCANNING: dict[int, tuple[str, bytes]] = {}


def _scan(reader_id: int, chunk: bytes) -> None:
    url, tail = _SCANNING.get(reader_id, ("?", b""))
    window = tail + chunk
    for form, label in secret_forms().items():
        if form.encode() in window:
            _SESSION_LEAKS.append((url, label))
    _SCANNING[reader_id] = (url, window[-64:])


class _ScannedReader(StreamReader):
    """A response body that is scanned as it arrives, however the test then reads it."""

    __slots__ = ()  # the same layout, so a reader's class can be switched to this one

    def feed_data(self, data, *args, **kwargs):
        _scan(id(self), bytes(data))
        return super().feed_data(data, *args, **kwargs)


class _ScannedResponse(ClientResponse):
    """A response of a test client to the gateway: its headers and every body byte are
    searched for the session's secrets."""

    async def start(self, connection):
        result = await super().start(connection)
        content = self.content
        _SCANNING[id(content)] = (str(self.url), b"")
        _scan(id(content), b"\n".join(name + b": " + value for name, value in self.raw_headers))
        _SCANNING[id(content)] = (str(self.url), b"")
        for chunk in list(getattr(content, "_buffer", ())):  # what came with the headers
            _scan(id(content), chunk)
        if type(content) is StreamReader:
            content.__class__ = _ScannedReader
        return result


class _ScannedClient(TestClient):
    def __init__(self, server, **kwargs) -> None:
        super().__init__(server, response_class=_ScannedResponse, **kwargs)


@pytest.fixture
def aiohttp_client_cls():
    """Every aiohttp test client (pytest-aiohttp's `aiohttp_client`) scans what it receives."""
    return _ScannedClient


class _ScannedSdkStream(httpx2.AsyncByteStream):
    """The body of a response the openai SDK receives, scanned as it is read."""

    def __init__(self, inner, url: str) -> None:
        self.inner = inner
        _SCANNING[id(self)] = (url, b"")

    async def __aiter__(self):
        async for chunk in self.inner:
            _scan(id(self), chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _scan_sdk_response(response) -> None:
    _SCANNING[id(response)] = (str(response.url), b"")
    _scan(id(response), "\n".join(f"{k}: {v}" for k, v in response.headers.items()).encode())
    response.stream = _ScannedSdkStream(response.stream, str(response.url))


IMGPROXY = [str(Path(sys.executable).parent / "imgproxy")]  # the installed console script


def run_imgproxy(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed `imgproxy` command; its output joins the session's scanned log."""
    result = subprocess.run([*IMGPROXY, *args], capture_output=True, text=True, timeout=30, **kwargs)
    _SESSION_LOG.extend((result.stdout + result.stderr).splitlines())
    return result


@pytest.fixture
def access_lines():
    """The access-log lines the test produces, parsed."""
    lines: list[str] = []
    stream = access_log.stream
    access_log.stream = _Lines(lines)
    yield lambda: [json.loads(line) for line in lines]
    access_log.stream = stream
    _SESSION_LOG.extend(lines)


@pytest.fixture(scope="session", autouse=True)
def all_log_output():
    """Every log line of the test session, formatted as in production; at the end of the
    session no key used in the tests may appear in it."""
    handler = _Collect(_SESSION_LOG)
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.DEBUG)
    stream = access_log.stream
    access_log.stream = _Lines(_SESSION_LOG)
    yield _SESSION_LOG
    access_log.stream = stream
    root.removeHandler(handler)
    root.setLevel(previous)
    text = "\n".join(_SESSION_LOG)
    leaked = sorted({label for form, label in secret_forms().items() if form in text})
    assert not leaked, f"keys appeared in log output: {leaked}"
    assert not _SESSION_LEAKS, f"keys appeared in responses to test clients: {sorted(set(_SESSION_LEAKS))[:20]}"


async def serve_fake(aiohttp_server, fake: FakeUpstream):
    """Start a fake upstream; afterwards, everything imgproxy sent it must have matched its spec."""
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    yield fake
    assert fake.invalid == [], f"imgproxy sent {type(fake).__name__} a request outside the spec: {fake.invalid}"


@pytest.fixture
async def fake_openai(aiohttp_server):
    async for fake in serve_fake(aiohttp_server, FakeOpenAI()):
        yield fake


@pytest.fixture
async def fake_stability(aiohttp_server):
    async for fake in serve_fake(aiohttp_server, FakeStability()):
        yield fake


@pytest.fixture
def config_text(fake_openai, fake_stability, tmp_path):
    def make(extra: str = "", **kwargs) -> str:
        return gateway_config(fake_openai.base_url, fake_stability.base_url, str(tmp_path / "images"), extra, **kwargs)

    return make


@pytest.fixture
def make_client(aiohttp_client, config_text):
    async def make(text: str | None = None, *, extra: str = "", env: dict | None = None, plugins=(), **kwargs):
        gateway = await Gateway.load(text=text or config_text(extra, **kwargs), env=env or {}, extra_plugins=plugins)
        client = await aiohttp_client(create_app(gateway))
        client.gateway = gateway
        return client

    return make


@pytest.fixture
async def client(make_client):
    return await make_client()


@pytest.fixture
async def sdk_for():
    """The official openai SDK pointed at a test gateway; closed after the test."""
    made = []

    def make(client, api_key: str = CLIENT_KEY) -> openai.AsyncOpenAI:
        scanned = openai.DefaultAsyncHttpxClient(event_hooks={"response": [_scan_sdk_response]})
        sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=api_key, max_retries=0, http_client=scanned)
        made.append(sdk)
        return sdk

    yield make
    for sdk in made:
        await sdk.close()


async def assert_error(resp, status: int, code: str | None, param: str | None = None) -> dict:
    body = await resp.json()
    assert resp.status == status, body
    assert list(ERROR_RESPONSE.iter_errors(body)) == [], body
    assert body["error"]["code"] == code, body
    assert body["error"]["param"] == param, body
    assert resp.headers.get("x-request-id")
    return body["error"]


async def images_body(resp) -> dict:
    body = await resp.json()
    assert resp.status == 200, body
    assert list(IMAGES_RESPONSE.iter_errors(body)) == [], body
    return body


@pytest.fixture
def usage_log(tmp_path):
    """Where the cost plugin of a test's gateway writes its usage records."""
    return tmp_path / "usage.jsonl"


@pytest.fixture
async def gateway(make_client, usage_log):
    """A gateway in front of the fakes that writes usage records to `usage_log`."""
    return await make_client(extra=f"cost: {{usage_log: {usage_log}}}")


def multipart_form(fields: dict, files=(), content_type: str = "application/octet-stream") -> aiohttp.FormData:
    """An edit's or a variation's form as a client sends it: `files` are (field name, bytes)."""
    data = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        data.add_field(name, str(value))
    for index, (name, content) in enumerate(files):
        data.add_field(name, content, filename=f"upload-{index}.bin", content_type=content_type)
    return data


async def download(client, url: str):
    """GET an absolute URL the gateway returned (it points at the gateway itself)."""
    assert url.startswith(str(client.make_url("/"))), url
    return await client.session.get(url)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session; tests keep apart by key prefix."""
    from tests.redisserver import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, to stop and start."""
    from tests.redisserver import RedisServer

    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


async def usage_records(path, count: int = 1) -> list[dict]:
    """The usage log's records once it holds `count` (records are written when a request is
    over, which may be just after its client saw the answer)."""
    for _ in range(200):
        if path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            if len(lines) >= count:
                return lines
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} usage records")


async def usage_record(usage_log, request_id: str) -> dict:
    """The usage record of one request, once it is written."""
    for _ in range(100):
        if usage_log.exists():
            for line in usage_log.read_text().splitlines():
                if json.loads(line)["request_id"] == request_id:
                    return json.loads(line)
        await asyncio.sleep(0.02)
    raise AssertionError(f"no usage record for {request_id}")


async def assert_each_image_is(client, answer: dict, response_format: str, expected: bytes) -> None:
    """Every image of an answer, downloaded from the gateway (url) or decoded (b64_json), is
    `expected` (a provider conformance check)."""
    for item in answer["data"]:
        if response_format == "url":
            resp = await download(client, item["url"])
            assert resp.status == 200 and await resp.read() == expected
        else:
            assert base64.b64decode(item["b64_json"]) == expected
