"""The upstream client: pooled sessions per egress policy, one request per attempt, body
readers within the byte budget, and aiohttp failures mapped to UpstreamErrors that say
whether the provider surely produced nothing."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from . import __version__, limits, untrusted_json
from .config import ProviderConfig
from .egress import AddressPolicy, AddressRefused, CheckingResolver, UrlRefused
from .errors import UpstreamError, upstream_error
from .inline_images import InlineImageError, InlineImageReader
from .redaction import redact

if TYPE_CHECKING:
    from .messages import Outcome

log = logging.getLogger("imgproxy.upstream")

MAX_JSON_BYTES = 256 * 1024 * 1024  # n=10 large PNGs as base64 stay well below this
# W3C Trace Context: version-traceid-parentid-flags in lowercase hex.
TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class UpstreamCall:
    """One attempt's handle on the upstream client: what an adapter needs to make its call
    (the request id and trace context to pass on, the time it has) and nothing of the gateway.
    `send` marks the request's outcome as having called the provider."""

    __slots__ = ("upstream", "request_id", "traceparent", "timeout", "outcome")

    def __init__(self, upstream: "Upstream", request_id: str, traceparent: str | None, timeout: float, outcome: "Outcome") -> None:
        self.upstream = upstream
        self.request_id = request_id
        # Never relay a client's arbitrary bytes: only a well-formed W3C traceparent.
        self.traceparent = traceparent if traceparent and TRACEPARENT.fullmatch(traceparent) else None
        self.timeout = timeout  # seconds this attempt may take
        self.outcome = outcome

    @classmethod
    def for_request(cls, ctx, timeout: float) -> "UpstreamCall":
        return cls(ctx.gateway.upstream, ctx.request_id, ctx.http.headers.get("traceparent"), timeout, ctx.outcome)


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
        self, call: UpstreamCall, provider: ProviderConfig, method: str, url: str, *, timeout: float | None = None, **kwargs
    ) -> aiohttp.ClientResponse:
        """Send one upstream request and return the response with its body still unread: the
        caller releases it. Connection failures and timeouts become 502/504. `timeout`: the
        call's own by default."""
        timeout = call.timeout if timeout is None else timeout
        headers = kwargs.pop("headers", {})
        headers["x-request-id"] = call.request_id
        headers.setdefault("Accept-Encoding", "identity")
        if call.traceparent:
            headers["traceparent"] = call.traceparent
        client_timeout = self._timeouts.get((timeout, provider.connect_timeout))
        if client_timeout is None:
            client_timeout = aiohttp.ClientTimeout(total=timeout, connect=provider.connect_timeout)
            if len(self._timeouts) < 64:  # the configured timeouts; not every remaining time of a retry
                self._timeouts[timeout, provider.connect_timeout] = client_timeout
        egress = provider.egress
        try:
            target = egress.target(url)
        except UrlRefused as exc:
            log.warning("refused a request to host %s for provider %s: %s", _host(url, provider), provider.name, redact(str(exc), (provider.api_key,)))
            raise upstream_error(
                f"The provider '{provider.name}' returned a URL on a host it is not allowed to use.", kind="refused", produced_nothing=True
            ) from None
        call.outcome.upstream_called = True
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
            raise upstream_error(
                f"The provider '{provider.name}' answered with a redirect, which this gateway does not follow.", kind="redirect", produced_nothing=True
            )
        return resp

    def request(self, call: UpstreamCall, provider: ProviderConfig, method: str, url: str, *, timeout: float | None = None, **kwargs) -> "Exchange":
        """`async with upstream.request(...) as response:` send, read, and release; failures
        while reading the body are mapped like those while sending."""
        return Exchange(self, call, provider, method, url, call.timeout if timeout is None else timeout, kwargs)

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
            raise upstream_error(f"The provider '{provider.name}' returned an answer that is not a JSON object.")
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
                f"The provider '{provider.name}' returned an answer that is not a JSON object with valid base64 images."
            ) from None
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise failure(exc, provider, None) from None

    async def first_chunk(self, resp: aiohttp.ClientResponse, provider: ProviderConfig) -> bytes:
        try:
            return await resp.content.readany()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise failure(exc, provider, None) from None

    async def fetch_image(
        self, call: UpstreamCall, provider: ProviderConfig, url: str, *, max_bytes: int, timeout: float
    ) -> tuple[bytes, str]:
        """Download an image a provider pointed at, only from that provider's own hosts (`send`
        checks the URL)."""
        async with self.request(call, provider, "GET", url, timeout=timeout) as resp:
            if resp.status != 200:
                raise upstream_error(f"Downloading an image from the provider '{provider.name}' failed with status {resp.status}.")
            content_type = resp.content_type if resp.content_type.startswith("image/") else "image/png"
            return await _read_limited(resp, max_bytes, what="image"), content_type


class Exchange:
    """The async context manager `Upstream.request` returns."""

    __slots__ = ("upstream", "call", "provider", "method", "url", "timeout", "kwargs", "response")

    def __init__(self, upstream: Upstream, call, provider, method, url, timeout, kwargs) -> None:
        self.upstream, self.call, self.provider, self.method, self.url, self.timeout, self.kwargs = (
            upstream, call, provider, method, url, timeout, kwargs
        )
        self.response = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        self.response = await self.upstream.send(self.call, self.provider, self.method, self.url, timeout=self.timeout, **self.kwargs)
        return self.response

    async def __aexit__(self, kind, exc, tb) -> bool:
        self.response.release()
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ClientError)):
            raise failure(exc, self.provider, self.timeout) from None
        return False


def failure(exc: BaseException, provider: ProviderConfig, timeout: float | None) -> UpstreamError:
    """The gateway error for an aiohttp failure talking to a provider (and an operator log line).
    Only a failure to connect surely produced nothing: once the request may have been sent, the
    provider may be generating (and billing) whatever we see."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # no connection was made: nothing sent
        log.warning("provider %s: no connection within %ss", provider.name, provider.connect_timeout)
        within = f"within {timeout:g} seconds" if timeout else "in time"
        return upstream_error(
            f"The provider '{provider.name}' did not answer {within}.", status=504, code="upstream_timeout",
            kind="connect", produced_nothing=True,
        )
    if isinstance(exc, asyncio.TimeoutError):
        log.warning("provider %s timed out after %ss", provider.name, timeout)
        within = f"within {timeout:g} seconds" if timeout else "in time"
        return upstream_error(f"The provider '{provider.name}' did not answer {within}.", status=504, code="upstream_timeout", kind="timeout")
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, AddressRefused):
        log.warning("refused to connect to provider %s: %s", provider.name, exc.os_error)
        return upstream_error(
            f"The provider '{provider.name}' is at an address this gateway may not connect to.", kind="refused", produced_nothing=True
        )
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unreachable, DNS: nothing was sent
        log.warning("cannot connect to provider %s: %s", provider.name, exc.os_error)
        return upstream_error(
            f"Could not connect to the provider '{provider.name}'.", code="upstream_unavailable", kind="connect", produced_nothing=True
        )
    log.warning("provider %s broke off its answer: %s", provider.name, describe(exc))
    return upstream_error(f"The provider '{provider.name}' closed the connection before a complete answer.")


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
        raise upstream_error(too_large)
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise upstream_error(too_large)
        limits.charge(len(chunk))  # held until the response is written: 503 past the process's budget
        yield chunk


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str = "answer") -> bytes:
    return b"".join([chunk async for chunk in _limited_chunks(resp, limit, what)])
