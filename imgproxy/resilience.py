"""Surviving provider failures without paying twice: which failures are tried again, how long
to wait, circuit breakers, and a request translated for a fallback model.

A failure is tried again (on the same target, or on a fallback) only when the provider surely
generated nothing (UpstreamError.produced_nothing): the request never left, or the provider
said it failed (429, 408, a 5xx with an error body). A timeout or a cut after the request was
sent is ambiguous: the provider may have generated, and billed, an image nobody received, so
it is tried again only where the operator allows it (`retry_ambiguous: true`). A refusal (4xx,
content policy) is never tried again: the same request would be refused again.

Circuit breakers are per process (per worker of `serve --workers N`): each learns from its
own calls.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime

from .catalog import CUSTOM_SIZE, NEVER_DROPPED, Capabilities
from .errors import TRANSIENT_KINDS, GatewayError, UpstreamError
from .messages import ImageRequest

# Ambiguous failures a `retry_ambiguous` provider may try again.
AMBIGUOUS_KINDS = frozenset({"timeout", "5xx", "bad_body"})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 1  # calls per target, the first one included: 1 is no retry
    backoff: float = 0.5  # seconds; doubled per attempt, full jitter
    max_backoff: float = 8.0
    retry_ambiguous: bool = False

    def may_try_again(self, error: BaseException) -> bool:
        """Whether calling again (this target or another) cannot make the client pay twice."""
        if not isinstance(error, UpstreamError):
            return False  # a refusal (4xx, content policy) or the gateway's own error
        if error.produced_nothing:
            return True
        return self.retry_ambiguous and error.kind in AMBIGUOUS_KINDS

    def retryable(self, error: BaseException) -> bool:
        """Whether the same target may be called again: a failure that can pass."""
        if not self.may_try_again(error):
            return False
        return error.kind in TRANSIENT_KINDS or (not error.produced_nothing and error.kind in AMBIGUOUS_KINDS)

    def delay(self, attempt: int, error: GatewayError, rng=random.random) -> float:
        """Seconds to wait before attempt `attempt + 1`: exponential with full jitter, or the
        upstream's Retry-After if it asks for longer."""
        wait = rng() * min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        after = retry_after(error.headers.get("Retry-After"))
        return max(wait, after) if after is not None else wait


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date), or None."""
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class BreakerConfig:
    failure_rate: float = 0.5  # share of failed calls in the window that opens the circuit
    window: float = 60.0  # seconds of calls looked at
    min_calls: int = 10  # fewer calls in the window never open it
    cooldown: float = 30.0  # seconds open before one probe is let through
    per_model: bool = False  # one circuit per model of the provider, not one for the provider


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)


class CircuitBreaker:
    """Closed: calls go through and are counted. Open (after `failure_rate` of at least
    `min_calls` calls in `window` failed): calls are refused for `cooldown`. Half-open: one
    probe goes through; its success closes the circuit, its failure opens it again."""

    def __init__(self, config: BreakerConfig, on_change=None, clock=time.monotonic) -> None:
        self.config = config
        self.state = CLOSED
        self._calls: deque[tuple[float, bool]] = deque()
        self._failures = 0
        self._opened = 0.0
        self._probing = False
        self._on_change = on_change
        self._clock = clock

    def allow(self) -> bool:
        if self.state == OPEN and self._clock() >= self._opened + self.config.cooldown:
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN:
            if self._probing:
                return False
            self._probing = True
            return True
        return self.state == CLOSED

    def retry_after(self) -> int:
        """Whole seconds until a probe may go through (at least 1)."""
        return max(1, math.ceil(self._opened + self.config.cooldown - self._clock()))

    def record(self, failed: bool) -> None:
        now = self._clock()
        if self.state == HALF_OPEN and self._probing:
            self._probing = False
            if failed:
                self._open(now)
            else:
                self._calls.clear()
                self._failures = 0
                self._set(CLOSED)
            return
        if self.state != CLOSED:
            return
        self._calls.append((now, failed))
        self._failures += failed
        while self._calls and self._calls[0][0] < now - self.config.window:
            self._failures -= self._calls.popleft()[1]
        if len(self._calls) >= self.config.min_calls and self._failures >= self.config.failure_rate * len(self._calls):
            self._open(now)

    def cancel_probe(self) -> None:
        """The probe ended without a verdict (cancelled): let another one through."""
        self._probing = False

    def _open(self, now: float) -> None:
        self._opened = now
        self._calls.clear()
        self._failures = 0
        self._set(OPEN)

    def _set(self, state: str) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state)


def counts_as_failure(error: BaseException | None) -> bool:
    """For the circuit: the provider failed (an UpstreamError); a refusal is an answer."""
    return isinstance(error, UpstreamError) and error.kind not in ("4xx",)


# Quality levels, from cheapest to best: a fallback gets the closest it has.
QUALITY_RANK = {"low": 0, "standard": 1, "medium": 1, "high": 2, "hd": 2}


def translate(request: ImageRequest, model: str, caps: Capabilities, strictness: str, drop: bool = False) -> ImageRequest | None:
    """The request for fallback `model`, or None if the fallback cannot serve it: with
    `skip`, any parameter it cannot honour as given; with `translate`, size to its nearest
    size of the same orientation and quality and style to its closest (see
    docs/operations.md). A larger n, a longer prompt or an option it lacks is never
    translated: the fallback is skipped, unless `drop` (the requested model's
    `unsupported_parameters: drop`) lets a `translate` leave the option out. What the client
    gave and the fallback leaves out is added to `dropped` (x-imgproxy-dropped-params)."""
    if request.n > caps.max_n or len(request.prompt) > caps.max_prompt_length:
        return None
    if request.form is not None and not takes_uploads(request, model, caps):
        return None
    if request.stream and request.n > caps.n_per_call:  # separate calls' events cannot be one stream
        return None
    dropped = list(request.dropped)
    options = dict(request.options)
    for name in request.options:
        if name not in caps.parameters:
            if not (drop and strictness == "translate" and name not in NEVER_DROPPED):
                return None
            del options[name]
            dropped.append(name)
    size, quality, style = request.size, request.quality, request.style
    if not caps.allows_size(size):
        size = None if strictness == "skip" else nearest_size(size, caps)
    if quality is not None and quality not in caps.qualities:
        if strictness == "skip":
            return None
        quality = closest_quality(quality, caps)  # None: the fallback takes no quality
        if quality is None and "quality" in request.given:
            dropped.append("quality")
    if quality is None and caps.qualities:
        quality = caps.default_quality
    if style is not None and style not in caps.styles:
        if strictness == "skip":
            return None
        style = caps.default_style if caps.styles else None
        if style is None and "style" in request.given:
            dropped.append("style")
    if size is None:
        return None
    return replace(request, model=model, size=size, quality=quality, style=style, options=options, dropped=tuple(dict.fromkeys(dropped)))


def takes_uploads(request: ImageRequest, model: str, caps: Capabilities) -> bool:
    """Whether the fallback does this edit or variation with these input images."""
    from .validation import check_uploads  # validation needs the routing table, which needs this module

    try:
        check_uploads(request.form, model, request.operation, caps)
    except GatewayError:
        return False
    return True


def nearest_size(size: str, caps: Capabilities) -> str | None:
    """The fallback's listed size of the same orientation closest in aspect, then in area."""
    if size == "auto":
        return caps.default_size
    match = CUSTOM_SIZE.fullmatch(size)
    if match is None:
        return None
    width, height = int(match[1]), int(match[2])
    orientation = (width > height) - (width < height)
    best = None
    for candidate in caps.sizes:
        found = CUSTOM_SIZE.fullmatch(candidate)
        if found is None:
            continue
        w, h = int(found[1]), int(found[2])
        if (w > h) - (w < h) != orientation:
            continue
        distance = (abs(math.log((w / h) / (width / height))), abs(w * h - width * height))
        if best is None or distance < best[0]:
            best = (distance, candidate)
    return best[1] if best else None


def closest_quality(quality: str, caps: Capabilities) -> str | None:
    if quality == "auto" or not caps.qualities:
        return caps.default_quality or (caps.qualities[0] if caps.qualities else None)
    rank = QUALITY_RANK.get(quality)
    ranked = [q for q in caps.qualities if q in QUALITY_RANK]
    if rank is None or not ranked:
        return caps.default_quality
    # The closest level; between two as close, the cheaper one.
    return min(ranked, key=lambda q: (abs(QUALITY_RANK[q] - rank), QUALITY_RANK[q]))


class Circuits:
    """The circuit breakers of one gateway's providers, made on first use: one per provider,
    or per provider and model (`per_model`). `on_change(provider, state)` gets the worst
    state of a provider's circuits (open, then half-open, then closed)."""

    def __init__(self, on_change=None) -> None:
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._on_change = on_change

    def for_target(self, target) -> CircuitBreaker | None:
        config = target.provider.circuit_breaker
        if config is None:
            return None
        key = (target.provider.name, target.model.name if config.per_model else "")
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = CircuitBreaker(config, lambda _state, provider=key[0]: self._changed(provider))
        return breaker

    def _changed(self, provider: str) -> None:
        if self._on_change is None:
            return
        states = {b.state for (p, _), b in self._breakers.items() if p == provider}
        self._on_change(provider, next(s for s in (OPEN, HALF_OPEN, CLOSED) if s in states or s == CLOSED))

    def states(self) -> dict[str, str]:
        """Per provider (or provider/model), the circuit's state: for /readyz?verbose."""
        return {f"{p}/{m}" if m else p: b.state for (p, m), b in self._breakers.items()}
