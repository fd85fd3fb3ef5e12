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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def to_response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=json.dumps(self.envelope()).encode(),
            content_type="application/json",
            headers=self.headers,
        )


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def upstream_error(
    message: str, *, status: int = 502, code: str = "upstream_bad_response", kind: str = "bad_body", produced_nothing: bool = False
) -> "UpstreamError":
    """The provider failed or answered something unusable: not the client's fault. By default
    a broken answer, which the provider may have generated (and billed)."""
    return UpstreamError(status, message, code=code, kind=kind, produced_nothing=produced_nothing)


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
