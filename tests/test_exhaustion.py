"""Resource exhaustion, against real `imgproxy serve` processes: a flood of connections that
never finish their headers, requests the HTTP parser refuses, and more large upstream answers
at once than the memory budget holds. docs/security.md says what these show."""

from __future__ import annotations

import asyncio
import contextlib
import base64
import json
import os
import re
import resource
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.fakes import FAKE_B64, openai_validator
from tests.processes import free_port, mock_upstream

IMGPROXY = str(Path(sys.executable).parent / "imgproxy")
CLIENT_KEY = "sk-exhaustion-client-key-0001"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"
MiB = 1024 * 1024
HELD_BACK = 1024  # bytes of each answer the slow upstream keeps until the test lets them go


class Served:
    def __init__(self, proc: subprocess.Popen, port: int, ops: int, log: Path) -> None:
        self.proc, self.port, self.ops, self.log = proc, port, ops, log

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def rss(self) -> int:
        """The process's resident memory in bytes (/proc/PID/status VmRSS)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024

    async def metric(self, name: str, **labels) -> float:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{self.ops}/metrics") as resp:
            text = await resp.text()
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = "^" + re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)$"
        found = re.search(pattern, text, re.M)
        assert found, f"{name}{labels} not in the scrape"
        return float(found.group(1))


@pytest.fixture
def gateway(tmp_path):
    procs: list[subprocess.Popen] = []

    async def start(server: str = "  header_timeout: 2", *, upstream: str = "http://127.0.0.1:9", nofile: int | None = None) -> Served:
        port, ops = free_port(), free_port()
        config = tmp_path / f"proxy-{len(procs)}.yaml"
        config.write_text(f"""
auth:
  keys:
    - {{name: team, key: {CLIENT_KEY}}}
providers:
  openai: {{type: openai, base_url: "{upstream}/v1", api_key: {UPSTREAM_KEY}, timeouts: {{connect: 2, total: 60}}}}
  placeholder: {{type: placeholder}}
models:
  gpt-image-1: {{provider: openai}}
  placeholder: {{provider: placeholder}}
images: {{directory: "{tmp_path / 'images'}"}}
metrics: {{port: {ops}, host: 127.0.0.1}}
server:
{server}
""")
        log = tmp_path / f"serve-{len(procs)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "STABILITY_", "IMGPROXY_"))}

        def limit_files() -> None:  # a common default, and below what the flood would need
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with log.open("w") as out:
            proc = subprocess.Popen(
                [IMGPROXY, "serve", "--config", str(config), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                preexec_fn=limit_files if nofile else None,
            )
        procs.append(proc)
        served = Served(proc, port, ops, log)
        for _ in range(200):
            try:
                async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return served
            except aiohttp.ClientError:
                assert proc.poll() is None, log.read_text()
            await asyncio.sleep(0.1)
        raise AssertionError("imgproxy serve did not start: " + log.read_text())

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


async def exchange(port: int, raw: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes (or resets) the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


async def test_a_flood_of_unfinished_headers_leaves_probes_answering_and_the_log_small(gateway):
    # Open files: the process gets 1,024 (a common default); 2,000 connections would exhaust
    # them, which took every port down (probes included) and wrote ~16,000 log lines a second.
    served = await gateway("  header_timeout: 8", nofile=1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:
        if hard < 2500:
            pytest.skip("the test process may not open 2,500 files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2500, hard))
    cap = int(re.search(r"lowered from 1024 to (\d+)", served.log.read_text()).group(1))

    async def slow_client():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", served.port), 10)
        except (OSError, asyncio.TimeoutError):
            return None
        writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer ")  # and never more
        return reader, writer

    flood = [c for c in await asyncio.gather(*(slow_client() for _ in range(2000))) if c is not None]
    try:
        assert len(flood) > cap + 500
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{served.ops}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                assert resp.status == 200
        # The API port holds exactly its cap; every other connection was refused at once.
        for _ in range(100):
            refused = await served.metric("imgproxy_http_connections_refused_total", listener="api")
            if refused == len(flood) - cap:
                break
            await asyncio.sleep(0.05)  # the last ones may still wait in the accept queue
        assert refused == len(flood) - cap
        assert await served.metric("imgproxy_http_connections", listener="api") == cap
        # A client now (refusals of the flood no longer lingering) reads a 503 it can act on.
        await asyncio.sleep(1.2)
        status, headers, body = parse(await exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"))
        assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "server_overloaded", "1")

        # Once the header timeout has passed, the held connections are closed and the API answers.
        for _ in range(100):
            answer = await exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
            if answer.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the API port did not recover")
        for _ in range(100):
            timeouts = await served.metric("imgproxy_http_header_timeouts_total", listener="api")
            if timeouts == cap:
                break
            await asyncio.sleep(0.05)
        assert timeouts == cap
        answers = await asyncio.gather(*(asyncio.wait_for(reader.read(), 10) for reader, _ in flood), return_exceptions=True)
        timed_out = [a for a in answers if isinstance(a, bytes) and a.startswith(b"HTTP/1.0 408")]
        assert len(timed_out) == cap
        assert parse(timed_out[0])[2]["error"]["code"] == "request_timeout"
    finally:
        for _, writer in flood:
            writer.close()
    lines = served.lines()
    print(f"log lines for a flood of {len(flood)} connections: {len(lines)}")
    # Bounded by ThrottledLog: 10 lines per kind of event, then one a second.
    assert len(lines) < 80, lines
    assert not [line for line in lines if json.loads(line)["level"] in ("error", "critical")]


async def test_the_parser_refuses_without_echoing_a_header(gateway):
    served = await gateway()
    secret = "sk-live-SECRET-in-a-bad-header"
    # A control character in the Authorization header.
    status, _, body = parse(await exchange(served.port, f"GET /healthz HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {secret}\x01x\r\n\r\n".encode()))
    assert (status, body["error"]["code"]) == (400, "bad_http_request")
    # One header line over aiohttp's line limit, and a header block over server.max_header_bytes.
    status, _, body = parse(await exchange(served.port, f"GET /healthz HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {secret}{'A' * 9000}\r\n\r\n".encode()))
    assert (status, body["error"]["code"]) == (431, "bad_http_request")
    many = "".join(f"X-Filler-{i}: {'v' * 4000}\r\n" for i in range(20))
    status, _, _ = parse(await exchange(served.port, f"GET /healthz HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {secret}\r\n{many}\r\n".encode()))
    assert status == 431
    # The same block trickled in: refused before it is complete.
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(f"GET /healthz HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {secret}\r\n".encode())
    for sent in range(1, 21):
        writer.write(f"X-Filler-{sent}: {'v' * 4000}\r\n".encode())
        try:
            answer = await asyncio.wait_for(reader.read(), 0.1)
            break
        except asyncio.TimeoutError:
            continue
    writer.close()
    assert sent < 20 and b" 431 " in answer.split(b"\r\n")[0]
    # A chunked body whose framing breaks after the headers were accepted.
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(
        f"POST /v1/images/generations HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n".encode()
    )
    await asyncio.sleep(0.3)
    writer.write(f"zz-{secret}\r\n0\r\n\r\n".encode())
    status, _, body = parse(await asyncio.wait_for(reader.read(), 10))
    writer.close()
    assert (status, body["error"]["code"]) == (400, "bad_http_request")
    # TLS on the plain port.
    status, _, _ = parse(await exchange(served.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + secret.encode()))
    assert status == 400

    for reason, count in (("invalid_header", 1), ("header_too_large", 3), ("bad_body", 1), ("bad_method", 1)):
        assert await served.metric("imgproxy_http_parser_errors_total", reason=reason) == count
    # The gateway still serves, and nothing of the headers reached the log.
    assert (await exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")).startswith(b"HTTP/1.1 200")
    served.proc.terminate()
    served.proc.wait(timeout=30)
    log = served.log.read_text()
    assert "SECRET" not in log and "AAAA" not in log and log.count("not valid HTTP") == 6
    assert '"level": "error"' not in log


class SlowUpstream:
    """OpenAI's images endpoint taking `delay` seconds to answer gpt-image-1 with a small image."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.validator = openai_validator("CreateImageRequest")
        self.invalid: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self.generations)
        return app

    async def generations(self, request: web.Request) -> web.Response:
        self.invalid.extend(e.message for e in self.validator.iter_errors(await request.json()))
        await asyncio.sleep(self.delay)
        usage = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}
        return web.json_response({"created": 1, "data": [{"b64_json": FAKE_B64}], "usage": usage})


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response with a Content-Length from a kept-alive connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    return int(head.split()[1]), await asyncio.wait_for(reader.readexactly(length), 15)


def generation(model: str, *, split: bool = False) -> bytes | tuple[bytes, bytes]:
    body = json.dumps({"model": model, "prompt": "a slow request", "response_format": "b64_json"}).encode()
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return (head, body) if split else head + body


async def test_the_header_deadline_spares_slow_bodies_long_answers_and_idle_keepalive(gateway, aiohttp_server):
    """The deadline is for headers only: what comes after them has other limits."""
    upstream = SlowUpstream(delay=2.5)
    fake = await aiohttp_server(upstream.app())
    served = await gateway("  header_timeout: 1", upstream=str(fake.make_url("")).rstrip("/"))
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    # A body trickled in over 2.5 s, after complete headers.
    head, body = generation("placeholder", split=True)
    writer.write(head)
    for at in range(0, len(body), len(body) // 5 + 1):
        await asyncio.sleep(0.5)
        writer.write(body[at : at + len(body) // 5 + 1])
    assert (await read_response(reader))[0] == 200
    # Idle on the kept-alive connection for longer than the deadline, then a request.
    await asyncio.sleep(1.5)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    # An answer that takes 2.5 s, with the start of a pipelined request sent behind it.
    writer.write(generation("gpt-image-1"))
    await asyncio.sleep(0.3)
    writer.write(b"GET /heal")
    status, answer = await read_response(reader)
    assert status == 200 and json.loads(answer)["data"][0]["b64_json"] == FAKE_B64
    # The pipelined request, never finished, gets its 408 once the first is answered.
    status, answer = await read_response(reader)
    assert (status, json.loads(answer)["error"]["code"]) == (408, "request_timeout")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert await served.metric("imgproxy_http_header_timeouts_total", listener="api") == 1
    assert upstream.invalid == []


class SlowLargeUpstream:
    """OpenAI's images endpoint answering gpt-image-1 with a large image, slowly, and holding
    back its last bytes until the test lets them go."""

    def __init__(self, image_bytes: int) -> None:
        b64 = base64.b64encode(os.urandom(image_bytes)).decode()
        usage = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}
        self.answer = json.dumps({"created": 1, "data": [{"b64_json": b64}], "usage": usage}).encode()
        self.calls = 0
        self.invalid: list[str] = []
        self.finish = asyncio.Event()
        self.validator = openai_validator("CreateImageRequest")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self.generations)
        return app

    async def generations(self, request: web.Request) -> web.StreamResponse:
        self.invalid.extend(e.message for e in self.validator.iter_errors(await request.json()))
        assert request.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        self.calls += 1
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(self.answer)
        await resp.prepare(request)
        step, held_back = 256 * 1024, len(self.answer) - HELD_BACK
        for at in range(0, held_back, step):
            await resp.write(self.answer[at : min(at + step, held_back)])
            await asyncio.sleep(0.005)
        await self.finish.wait()
        await resp.write(self.answer[held_back:])
        await resp.write_eof()
        return resp


async def test_large_upstream_answers_beyond_the_budget_get_503_not_a_growing_heap(gateway, aiohttp_server):
    upstream = SlowLargeUpstream(15 * MiB)  # a 20 MiB answer
    fake = await aiohttp_server(upstream.app())
    budget = 64 * MiB
    served = await gateway(f"  max_upstream_buffer_bytes: {budget}", upstream=str(fake.make_url("")).rstrip("/"))
    baseline, peak = served.rss(), 0

    async def sample():
        nonlocal peak
        while True:
            peak = max(peak, served.rss())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    async def generate() -> tuple[int, dict, dict]:
        async with session.post(
            f"http://127.0.0.1:{served.port}/v1/images/generations", json={"model": "gpt-image-1", "prompt": "a large image"},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        ) as resp:
            return resp.status, dict(resp.headers), await resp.json()

    try:
        # Three answers being read hold 60 MiB: past three quarters of the budget, a new
        # request is refused before any upstream call, and the three still complete.
        first = [asyncio.create_task(generate()) for _ in range(3)]
        for _ in range(300):
            if await served.metric("imgproxy_upstream_buffer_bytes") >= 3 * (len(upstream.answer) - HELD_BACK):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the answers were not being read")
        status, headers, body = await generate()
        assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "server_overloaded", "5")
        assert upstream.calls == 3
        upstream.finish.set()
        for status, _, body in await asyncio.gather(*first):
            assert status == 200 and len(body["data"][0]["b64_json"]) == 20 * MiB
        for _ in range(100):
            if await served.metric("imgproxy_upstream_buffer_bytes") == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the budget was not released")

        # Six at once (120 MiB) are all admitted (nothing is held yet): each that pushes the
        # total past the budget fails while reading and gives its room back at once, so that
        # the three left fit (60 MiB) and complete (more, if one finished early).
        results = await asyncio.gather(*(generate() for _ in range(6)))
        failed = [r for r in results if r[0] != 200]
        assert upstream.calls == 9  # the request refused at admission never reached it
        assert 1 <= len(failed) <= 3
        for status, headers, body in failed:
            assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "server_overloaded", "5")
        assert await served.metric("imgproxy_upstream_buffer_refusals_total", stage="admission") == 1
        assert await served.metric("imgproxy_upstream_buffer_refusals_total", stage="reading") == len(failed)
        # Everything held was given back: nothing leaks from the budget.
        for _ in range(100):
            if await served.metric("imgproxy_upstream_buffer_bytes") == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the budget was not released after the failures")
        assert upstream.invalid == []
    finally:
        sampler.cancel()
        await session.close()
    print(f"RSS: {baseline / MiB:.0f} MiB at rest, {peak / MiB:.0f} MiB at most; budget {budget / MiB:.0f} MiB")
    # Every byte charged exists up to three times at once while it is read and answered (the
    # body read whole, the parsed string, the response being written), and the allocator keeps
    # some freed memory: growth stays within 5 x the budget (measured: 160-240 MiB), where the
    # nine answers asked for grew the heap by ~500 MiB without a budget (1 GiB configured).
    assert peak - baseline < 5 * budget


async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout(gateway):
    # It would hold its answer (12 MiB of base64 here) and the upstream connection for good.
    upstream, upstream_port = mock_upstream("--format", "b64_json", "--image-bytes", str(12 * MiB))
    try:
        served = await gateway("  write_timeout: 1", upstream=f"http://127.0.0.1:{upstream_port}")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        sock.connect(("127.0.0.1", served.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        body = json.dumps({"model": "gpt-image-1", "prompt": "a large image"}).encode()
        writer.write(
            f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()
        for _ in range(300):  # and read nothing meanwhile
            if await served.metric("imgproxy_http_write_timeouts_total", listener="api") >= 1:
                break
            await asyncio.sleep(0.05)
        assert await served.metric("imgproxy_http_write_timeouts_total", listener="api") == 1
        received = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
                received += len(chunk)
        assert received < 12 * MiB  # cut off, not finished
        writer.close()
        # A client that reads, however slowly, is never cut: the same answer whole.
        async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{served.port}/v1/images/generations", json={"model": "gpt-image-1", "prompt": "again"},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        ) as resp:
            total = 0
            async for chunk in resp.content.iter_chunked(1 << 20):
                total += len(chunk)
                await asyncio.sleep(0.02)
        assert resp.status == 200 and total == resp.content_length > 12 * MiB
    finally:
        upstream.kill()
