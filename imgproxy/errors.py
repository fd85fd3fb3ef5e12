"""The gateway's one error type, rendered in one place as OpenAI's error envelope."""

from __future__ import annotations

import json

from aiohttp import web


class GatewayError(Exception):
    """A refusal or failure that reaches the client as `{"error": {...}}` with an HTTP status.

    Raise it anywhere on the request path (core, provider adapters, plugins); the server's
    error middleware renders it. `message` is shown to the client, so it must never hold a
    provider key or an upstream's raw authentication text.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        self._should_retry = should_retry

    @property
    def should_retry(self) -> bool | None:
        """Whether the same request can succeed if the client sends it again (the
        `x-should-retry` header the official SDKs obey); None: not said."""
        if self._should_retry is not None:
            return self._should_retry
        if self.code in NEVER_RETRY:
            return False
        if self.status in (429, 503):
            return True
        if self.status < 500:
            return False  # the request itself is refused: the same one is refused again
        return None

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def to_response(self) -> web.Response:
        headers = self.headers
        advice = self.should_retry
        if advice is not None:
            headers = {**headers, "x-should-retry": "true" if advice else "false"}
        return web.Response(
            status=self.status,
            body=json.dumps(self.envelope()).encode(),
            content_type="application/json",
            headers=headers,
        )


# Refusals that no retry of the same request can turn around.
NEVER_RETRY = frozenset({"provider_not_configured", "insufficient_quota", "model_not_allowed", "upstream_quota_exceeded", "upstream_auth_failed"})


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def upstream_error(
    message: str, *, status: int = 502, code: str = "upstream_bad_response", kind: str = "bad_body", produced_nothing: bool = False
) -> "UpstreamError":
    """The provider failed or answered something unusable: not the client's fault. By default
    a broken answer, which the provider may have generated (and billed)."""
    return UpstreamError(status, message, code=code, kind=kind, produced_nothing=produced_nothing)


# Failures that can go the other way on a second try.
TRANSIENT_KINDS = frozenset({"connect", "rate_limited", "5xx", "timeout"})
# The bounded set of ways a provider call fails (a metric label; the retry policy reads it).
UPSTREAM_ERROR_KINDS = (
    "timeout", "connect", "5xx", "4xx", "bad_body", "auth", "quota", "not_found", "rate_limited", "refused", "redirect",
)


class UpstreamError(GatewayError):
    """A provider call that failed: `kind` says how (UPSTREAM_ERROR_KINDS) and
    `produced_nothing` whether the provider surely generated (and billed) nothing. True: the
    request never left (connect refused, DNS), or the provider answered that it did not
    generate (429, 408, a 5xx with an error body). False: a timeout or a cut after the request
    was sent, or a broken answer: it may have generated, so a retry could pay twice."""

    def __init__(self, status: int, message: str, *, kind: str, produced_nothing: bool, **kwargs) -> None:
        kwargs.setdefault("type", "server_error")
        super().__init__(status, message, **kwargs)
        self.kind = kind
        self.produced_nothing = produced_nothing

    @property
    def should_retry(self) -> bool | None:
        if self._should_retry is not None:
            return self._should_retry
        # An ambiguous failure is not worth a client's retry either: it may pay twice.
        return self.produced_nothing and self.kind in TRANSIENT_KINDS