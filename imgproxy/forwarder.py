"""Talking to upstreams: one pooled ClientSession, failures mapped to gateway errors, and
answers streamed to the client as they arrive."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from . import __version__, limits, untrusted_json
from .config import ProviderConfig
from .egress import AddressPolicy, AddressRefused, CheckingResolver, UrlRefused
from .errors import GatewayError, upstream_error
from .inline_images import AnswerCheck, InlineImageError, InlineImageReader
from .messages import RequestContext, StreamedReply, token_usage
from .redaction import redact

log = logging.getLogger("imgproxy.upstream")

MAX_JSON_BYTES = 256 * 1024 * 1024  # n=10 large PNGs as base64 stay well below this
# W3C Trace Context: version-traceid-parentid-flags in lowercase hex.
TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class Upstream:
    """Owns the connection pools of one gateway's providers, and checks where each request goes."""

    def __init__(self, policies=()) -> None:
        # One pool per address policy (most configs have one): a connection made under one
        # provider's policy is never reused under another's.
        self._sessions: dict[AddressPolicy, tuple[aiohttp.ClientSession, CheckingResolver]] = {}
        self._policies = tuple(policies)
        self._started = False
        self._timeouts: dict[tuple, aiohttp.ClientTimeout] = {}  # a few per config: built once

    async def start(self) -> None:
        self._started = True
        for policy in self._policies:
            self.session(policy)

    async def close(self) -> None:
        for session, resolver in self._sessions.values():
            await session.close()
            await resolver.close()

    def session(self, policy: AddressPolicy) -> aiohttp.ClientSession:
        pair = self._sessions.get(policy)
        if pair is None:
            assert self._started, "Upstream.start() was not awaited"
            # No per-host cap: concurrency is bounded by the clients, and a slow image model
            # would otherwise queue requests behind the pool. Every DNS answer is checked.
            resolver = CheckingResolver(policy)
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, resolver=resolver)
            session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": f"imgproxy/{__version__}"})
            pair = self._sessions[policy] = (session, resolver)
        return pair[0]

    async def send(
        self, ctx: RequestContext, provider: ProviderConfig, method: str, url: str, *, timeout: float, **kwargs
    ) -> aiohttp.ClientResponse:
        """Send one upstream request and return the response with its body still unread: the
        caller releases it. Connection failures and timeouts become 502/504."""
        headers = kwargs.pop("headers", {})
        headers["x-request-id"] = ctx.request_id
        headers.setdefault("Accept-Encoding", "identity")
        traceparent = ctx.http.headers.get("traceparent")
        if traceparent and TRACEPARENT.fullmatch(traceparent):  # never relay a client's arbitrary bytes
            headers["traceparent"] = traceparent
        client_timeout = self._timeouts.get((timeout, provider.connect_timeout))
        if client_timeout is None:
            client_timeout = self._timeouts[timeout, provider.connect_timeout] = aiohttp.ClientTimeout(total=timeout, connect=provider.connect_timeout)
        egress = provider.egress
        try:
            target = egress.target(url)
        except UrlRefused as exc:
            log.warning("refused a request to host %s for provider %s: %s", _host(url, provider), provider.name, redact(str(exc), (provider.api_key,)))
            raise upstream_error(
                f"The provider '{provider.name}' returned a URL on a host it is not allowed to use.", code="upstream_bad_response"
            ) from None
        ctx.outcome.upstream_called = True
        try:
            resp = await self.session(egress.addresses).request(
                method, target, headers=headers, timeout=client_timeout, allow_redirects=False, **kwargs
            )
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise failure(exc, provider, timeout) from None
        if 300 <= resp.status < 400:
            # Never followed: the next hop would be a host the upstream chose (with our request).
            resp.release()
            log.warning(
                "provider %s answered HTTP %s, a redirect to host %s, which is not followed",
                provider.name, resp.status, _host(resp.headers.get("Location", ""), provider),
            )
            raise upstream_error(f"The provider '{provider.name}' answered with a redirect, which this gateway does not follow.", code="upstream_bad_response")
        return resp

    def request(self, ctx: RequestContext, provider: ProviderConfig, method: str, url: str, *, timeout: float, **kwargs) -> "Exchange":
        """`async with upstream.request(...) as response:` send, read, and release; failures
        while reading the body are mapped like those while sending."""
        return Exchange(self, ctx, provider, method, url, timeout, kwargs)

    async def read_json(self, resp: aiohttp.ClientResponse, provider: ProviderConfig) -> dict:
        """The answer as a JSON object, or 502 for anything else (garbage, truncation, HTML)."""
        try:
            raw = await _read_limited(resp, MAX_JSON_BYTES)
            body = untrusted_json.loads(raw)
        except ValueError as exc:  # not JSON, not UTF-8, or beyond untrusted_json's bounds
            log.warning("provider %s sent a body that is not JSON (status %s): %s", provider.name, resp.status, str(exc)[:200])
            body = None
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise failure(exc, provider, None) from None
        if not isinstance(body, dict):
            raise upstream_error(
                f"The provider '{provider.name}' returned an answer that is not a JSON object.", code="upstream_bad_response"
            )
        return body

    async def read_inline_images(
        self, resp: aiohttp.ClientResponse, provider: ProviderConfig, keep: int | None = None
    ) -> tuple[dict, list[bytearray | None]]:
        """An images answer read as it arrives, its base64 images decoded on the way (see
        inline_images): the skeleton of the JSON object and the images (the first `keep`;
        None for the rest), or 502."""
        reader = InlineImageReader(keep)
        try:
            async for chunk in _limited_chunks(resp, MAX_JSON_BYTES):
                reader.feed(chunk)
            return reader.finish()
        except InlineImageError as exc:
            log.warning("provider %s sent a broken images answer (status %s): %s", provider.name, resp.status, exc)
            raise upstream_error(
                f"The provider '{provider.name}' returned an answer that is not a JSON object with valid base64 images.",
                code="upstream_bad_response",
            ) from None
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise failure(exc, provider, None) from None

    async def first_chunk(self, resp: aiohttp.ClientResponse, provider: ProviderConfig) -> bytes:
        try:
            return await resp.content.readany()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise failure(exc, provider, None) from None

    async def fetch_image(
        self, ctx: RequestContext, provider: ProviderConfig, url: str, *, max_bytes: int, timeout: float
    ) -> tuple[bytes, str]:
        """Download an image a provider pointed at, only from that provider's own hosts (`send`
        checks the URL)."""
        async with self.request(ctx, provider, "GET", url, timeout=timeout) as resp:
            if resp.status != 200:
                raise upstream_error(
                    f"Downloading an image from the provider '{provider.name}' failed with status {resp.status}.",
                    code="upstream_bad_response",
                )
            content_type = resp.content_type if resp.content_type.startswith("image/") else "image/png"
            return await _read_limited(resp, max_bytes, what="image"), content_type


class Exchange:
    """The async context manager `Upstream.request` returns."""

    __slots__ = ("upstream", "ctx", "provider", "method", "url", "timeout", "kwargs", "response")

    def __init__(self, upstream: Upstream, ctx, provider, method, url, timeout, kwargs) -> None:
        self.upstream, self.ctx, self.provider, self.method, self.url, self.timeout, self.kwargs = (
            upstream, ctx, provider, method, url, timeout, kwargs
        )
        self.response = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        self.response = await self.upstream.send(self.ctx, self.provider, self.method, self.url, timeout=self.timeout, **self.kwargs)
        return self.response

    async def __aexit__(self, kind, exc, tb) -> bool:
        self.response.release()
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ClientError)):
            raise failure(exc, self.provider, self.timeout) from None
        return False


def failure(exc: BaseException, provider: ProviderConfig, timeout: float | None) -> GatewayError:
    """The gateway error for an aiohttp failure talking to a provider (and an operator log line)."""
    if isinstance(exc, asyncio.TimeoutError):
        log.warning("provider %s timed out after %ss", provider.name, timeout)
        within = f"within {timeout:g} seconds" if timeout else "in time"
        return upstream_error(f"The provider '{provider.name}' did not answer {within}.", status=504, code="upstream_timeout")
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, AddressRefused):
        log.warning("refused to connect to provider %s: %s", provider.name, exc.os_error)
        return upstream_error(
            f"The provider '{provider.name}' is at an address this gateway may not connect to.", code="upstream_bad_response"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        log.warning("cannot connect to provider %s: %s", provider.name, exc.os_error)
        return upstream_error(f"Could not connect to the provider '{provider.name}'.", code="upstream_unavailable")
    log.warning("provider %s broke off its answer: %s", provider.name, describe(exc))
    return upstream_error(f"The provider '{provider.name}' closed the connection before a complete answer.", code="upstream_bad_response")


def _host(url: str, provider: ProviderConfig) -> str:
    """The host of a URL an upstream gave, for logs: never its query (it may hold a signature),
    and redacted (an upstream's URL is its words)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        host = None
    return redact(repr(host), (provider.api_key,))


def describe(exc: BaseException) -> str:
    """An aiohttp failure for a log line: its class, status and host. Never its repr or str:
    those of ClientResponseError and TooManyRedirects carry the request with its headers
    (the provider key) and the upstream's own words."""
    parts = [type(exc).__name__]
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status:
        parts.append(f"status {status}")
    host = getattr(getattr(getattr(exc, "request_info", None), "url", None), "host", None)
    if isinstance(host, str):
        parts.append(f"host {host}")
    return ", ".join(parts)


async def _limited_chunks(resp: aiohttp.ClientResponse, limit: int, what: str = "answer"):
    """The body's chunks as they arrive, or 502 once it is larger than `limit`."""
    too_large = f"The provider's {what} is larger than {limit} bytes."
    if resp.content_length is not None and resp.content_length > limit:
        raise upstream_error(too_large, code="upstream_bad_response")
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise upstream_error(too_large, code="upstream_bad_response")
        limits.charge(len(chunk))  # held until the response is written: 503 past the process's budget
        yield chunk


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str = "answer") -> bytes:
    return b"".join([chunk async for chunk in _limited_chunks(resp, limit, what)])


class StreamTap:
    """Watches bytes that are streamed through, so usage can be recorded without holding them.

    Counts images (`"b64_json"` keys, or completed events of a stream) and keeps the last
    `usage` object seen. Never copies a whole chunk: only its edges are kept.
    """

    USAGE = b'"usage"'
    TAIL = 4096

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.marker = b'"image_generation.completed"' if sse else b'"b64_json"'
        self.images = 0
        self.usage: dict | None = None
        self._edge = b""  # the last len(marker) - 1 bytes: a marker may straddle two chunks
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        keep = len(self.marker) - 1
        self.images += (self._edge + chunk[:keep]).count(self.marker)
        # Hop from quote to quote (find of one byte is a memchr): base64 runs hold no quotes,
        # so this is ten times faster than counting the marker across the whole chunk.
        marker, at = self.marker, chunk.find(b'"')
        while at != -1:
            if chunk.startswith(marker, at):
                self.images += 1
            at = chunk.find(b'"', at + 1)
        self._edge = (self._edge + chunk[-keep:])[-keep:]
        # Usage sits at the end of a JSON body and in the final event.
        self._tail = (self._tail + chunk[-self.TAIL :])[-self.TAIL :]

    def finish(self) -> None:
        at = self._tail.rfind(self.USAGE)
        if at < 0:
            return
        start = self._tail.find(b"{", at)
        if start < 0:
            return
        try:
            usage, _ = untrusted_json.raw_decode(self._tail[start:].decode())
        except ValueError:  # UnicodeDecodeError included: an upstream may send anything here
            return
        self.usage = token_usage(usage)


async def forward_stream(ctx: RequestContext, reply: StreamedReply, tap: StreamTap | AnswerCheck) -> web.StreamResponse:
    """Copy an upstream answer to the client chunk by chunk. Status and headers are fixed
    before the first byte; a break upstream after that ends the client's response early
    (an `error` event first, for server-sent events)."""
    if not tap.sse:
        return await forward_answer(ctx, reply, tap)
    upstream = reply.response
    out = web.StreamResponse(status=200, headers={"Content-Type": reply.content_type, "Cache-Control": "no-cache"})
    ctx.stamp(out)
    await out.prepare(ctx.http)
    try:
        if reply.first_chunk:
            await _relay(ctx, out, tap, reply.first_chunk)
        async for chunk in upstream.content.iter_any():
            before = tap.images
            tap.feed(chunk)
            if tap.images > ctx.request.n:
                # More images than asked for: relay the events before the first extra one and
                # end the stream there (they are neither delivered nor paid for).
                log.warning("upstream streamed more than %d images (request %s): the rest dropped", ctx.request.n, ctx.request_id)
                tap.images = ctx.request.n
                await _send(ctx, out, _events_before(chunk, tap.marker, ctx.request.n - before))
                break
            await _send(ctx, out, chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, asyncio.TimeoutError):
        log.warning("upstream broke off a streamed answer (request %s)", ctx.request_id)
        ctx.outcome.error_code = "upstream_bad_response"
        error = GatewayError(502, "The provider broke off the stream.", type="server_error", code="upstream_bad_response")
        event = {"type": "error", **error.envelope()}
        await out.write(f"event: error\ndata: {json.dumps(event)}\n\n".encode())
    except ConnectionResetError:
        # The client went away mid-answer; what was generated is still accounted for.
        log.info("client closed the connection during a streamed answer (request %s)", ctx.request_id)
        ctx.outcome.error_code = "client_closed_request"
        tap.finish()
        return out
    tap.finish()
    await out.write_eof()
    return out


async def forward_answer(ctx: RequestContext, reply: StreamedReply, check: AnswerCheck) -> web.StreamResponse:
    """Relay a JSON images answer as it arrives, checked on the way (inline_images.AnswerCheck).

    The status line goes out only after the first read passed the check, and the read that
    holds the end of the answer only after the whole answer did: on a fault, the connection
    is dropped with the body incomplete, so the client never holds a whole body that is not
    a valid answer. Decoded content encodings are relayed without the upstream's length."""
    upstream = reply.response
    try:
        check.feed(reply.first_chunk)
        if upstream.content.at_eof():
            # The whole answer came with the first read (small answers do): send it in one piece.
            check.finish()
            ctx.outcome.bytes_sent = len(reply.first_chunk)
            return web.Response(body=reply.first_chunk, headers={"Content-Type": reply.content_type})
    except InlineImageError as exc:
        raise _bad_answer(ctx, exc) from None
    out = web.StreamResponse(status=200, headers={"Content-Type": reply.content_type})
    if upstream.content_length is not None and upstream.headers.get("Content-Encoding", "identity") == "identity":
        out.content_length = upstream.content_length
    ctx.stamp(out)
    await out.prepare(ctx.http)
    held, held_images, delivered = [reply.first_chunk], check.complete, 0
    try:
        async for chunk in _limited_chunks(upstream, MAX_JSON_BYTES):
            check.feed(chunk)
            if not check.ended:  # held reads cannot hold the answer's end: send them
                for piece in held:
                    await _send(ctx, out, piece)
                held, delivered = [], held_images
            held.append(chunk)
            held_images = check.complete
        check.finish()
        for piece in held:
            await _send(ctx, out, piece)
        delivered = held_images
    except ConnectionResetError:
        # The client went away mid-answer; what it was sent whole is still accounted for.
        log.info("client closed the connection during a streamed answer (request %s)", ctx.request_id)
        ctx.outcome.error_code = "client_closed_request"
        check.images = delivered
        return out
    except (InlineImageError, GatewayError, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, asyncio.TimeoutError) as exc:
        log.warning("upstream sent a bad or broken answer after the status (request %s): %s", ctx.request_id, exc)
        ctx.outcome.error_code = "upstream_bad_response"
        check.images, check.usage = delivered, None
        if ctx.http.transport is not None:
            # The status is out: dropping the connection is the only way left to say "failed".
            ctx.http.transport.close()
        return out
    await out.write_eof()
    return out


def _bad_answer(ctx: RequestContext, exc: Exception) -> GatewayError:
    log.warning("upstream sent a bad or broken answer (request %s): %s", ctx.request_id, exc)
    return upstream_error(
        f"The provider '{ctx.route.provider.name}' returned an answer that is not a valid images response.",
        code="upstream_bad_response",
    )


def _events_before(chunk: bytes, marker: bytes, allowed: int) -> bytes:
    """The events of `chunk` before the one that carries its (allowed + 1)-th marker."""
    at = -1
    for _ in range(allowed + 1):
        at = chunk.find(marker, at + 1)
        if at < 0:  # the marker straddled two reads: nothing of this one is sent
            return b""
    end = chunk.rfind(b"\n\n", 0, at)
    return chunk[: end + 2] if end >= 0 else b""


async def _send(ctx: RequestContext, out: web.StreamResponse, chunk: bytes) -> None:
    await out.write(chunk)
    ctx.outcome.bytes_sent += len(chunk)


async def _relay(ctx: RequestContext, out: web.StreamResponse, tap: StreamTap, chunk: bytes) -> None:
    tap.feed(chunk)
    await out.write(chunk)
    ctx.outcome.bytes_sent += len(chunk)
