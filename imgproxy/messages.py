"""The objects that travel along the request path: the validated request, the provider's
answer, and the per-request context that hooks see."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .privacy import hash_user

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

    from .gateway import Gateway
    from .routing import Route, Target
    from .uploads import Form


@dataclass
class ImageRequest:
    """A generation request after validation, with the model's defaults filled in."""

    prompt: str
    model: str  # the public model name from the routing table
    n: int
    size: str
    response_format: str
    moderation: str = "auto"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # Optional GPT-image parameters the client gave: background, output_format, ... .
    options: dict[str, Any] = field(default_factory=dict)
    # generate, edit or variation; the last two come with the uploaded images.
    operation: str = "generate"
    form: "Form | None" = None
    # Parameters the client gave that the upstream call leaves out (the model's
    # `unsupported_parameters: drop`, or a fallback's translation): x-imgproxy-dropped-params.
    dropped: tuple[str, ...] = ()
    # Which of quality and style the client gave itself (else they are the model's defaults).
    given: frozenset[str] = frozenset()

    @property
    def stream(self) -> bool:
        return bool(self.options.get("stream"))


@dataclass
class GeneratedImage:
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    content_type: str = "image/png"
    # The image itself, when the adapter decoded it while reading (an image to be hosted).
    data: bytes | bytearray | None = None
    # Why an image asked for as a URL is returned inline (b64_json) instead, e.g. "store_unavailable".
    inline_reason: str | None = None

    def to_json(self) -> dict:
        out = {}
        if self.b64_json is not None:
            out["b64_json"] = self.b64_json
        if self.url is not None:
            out["url"] = self.url
        if self.revised_prompt is not None:
            out["revised_prompt"] = self.revised_prompt
        return out


@dataclass
class ImagesResult:
    """A provider's answer in neutral form; the rewrite hook shapes it for the client."""

    created: int
    images: list[GeneratedImage]
    usage: dict | None = None
    # Response fields GPT image models add (background, output_format, size, quality).
    extra: dict[str, Any] = field(default_factory=dict)
    # Images the provider withheld or blurred for content policy.
    filtered: int = 0

    def to_json(self) -> dict:
        body = {"created": self.created, "data": [image.to_json() for image in self.images], **self.extra}
        if self.usage is not None:
            body["usage"] = self.usage
        return body


_TOKEN_COUNTS = ("total_tokens", "input_tokens", "output_tokens")
_TOKEN_DETAILS = ("text_tokens", "image_tokens")


def token_usage(value) -> dict | None:
    """An upstream's `usage` object if its token counts are counts, else None: usage is billed
    from, so a string or a negative count must not reach the cost arithmetic."""
    if not isinstance(value, dict) or not _counts(value, _TOKEN_COUNTS):
        return None
    details = value.get("input_tokens_details")
    if details is not None and not (isinstance(details, dict) and _counts(details, _TOKEN_DETAILS)):
        return None
    return value


def _counts(table: dict, names: tuple[str, ...]) -> bool:
    return all(type(table.get(name, 0)) is int and table.get(name, 0) >= 0 for name in names)


@dataclass
class StreamedReply:
    """An upstream answer to forward to the client as it arrives, without holding it whole.

    It owns the upstream response from the moment the adapter returns it: `async with reply:`
    releases it on the way out, whatever happens, and nothing else does."""

    response: "aiohttp.ClientResponse"
    content_type: str
    # Bytes the adapter already read from `response` to check it; sent first.
    first_chunk: bytes = b""

    async def __aenter__(self) -> "StreamedReply":
        return self

    async def __aexit__(self, kind, exc, tb) -> None:
        self.response.release()


@dataclass
class Identity:
    """Who is calling: set by the authenticate hook. `name` is the key's label, never the key."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What happened, for the record-usage hook: set on success and on failure alike."""

    status: int = 0
    error_code: str | None = None
    images: int = 0
    usage: dict | None = None
    upstream_seconds: float | None = None
    bytes_sent: int = 0
    # Images the provider withheld for content policy (Stability's filtered artifacts).
    filtered: int = 0
    # Set by the cost plugin: what the request cost.
    cost_usd: float = 0.0
    # How the provider call failed, if it did (imgproxy.metrics.UPSTREAM_ERROR_KINDS).
    upstream_error_kind: str | None = None
    # Whether a request went to the provider at all (not, for example, without a provider key).
    upstream_called: bool = False
    # Cut short after the provider was called (a shutdown's drain timeout): billed at the worst case.
    cut: bool = False
    # Provider calls made (retries and fallbacks included), and those skipped for an open circuit.
    attempts: int = 0
    # The answer was complete but the client had hung up: recorded as 499, billed as delivered.
    client_left: bool = False
    # Jobs an asynchronous provider accepted (and bills) that were not delivered: a job that
    # never finished within the deadline, failed or could not be downloaded. Recorded at their price.
    undelivered_billed: int = 0


@dataclass
class RequestContext:
    gateway: "Gateway"
    http: "web.Request"
    request_id: str
    started: float = field(default_factory=time.monotonic)
    body: dict | None = None
    route: "Route | None" = None
    # Where the current (last) provider call goes: the route's own target unless a fallback took over.
    target: "Target | None" = None
    request: ImageRequest | None = None
    identity: Identity | None = None
    outcome: Outcome = field(default_factory=Outcome)
    # A plugin that must see every response body (not a streamed pass-through) sets this.
    needs_body: bool = False
    # Per-request scratch space for plugins, keyed by plugin name.
    scratch: dict[str, Any] = field(default_factory=dict)
    # Headers added to whatever response the client gets, success or error.
    response_headers: dict[str, str] = field(default_factory=dict)

    def stamp(self, response: "web.StreamResponse") -> None:
        """Add the request id and the plugins' headers to a response before it is sent."""
        response.headers["x-request-id"] = self.request_id
        response.headers.update(self.response_headers)

    @cached_property
    def user_hash(self) -> str | None:
        """The request's `user`, hashed: the only form of it that may be logged or stored."""
        user = self.request.user if self.request else None
        return hash_user(user, self.gateway.config.user_hash_key)
