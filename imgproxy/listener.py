"""The listening ports' defences, around aiohttp's HTTP server: a cap on open connections, a
deadline and a size limit for a request's headers, and the parser's refusals answered as
OpenAI envelopes that carry nothing of the request, counted, and logged at a bounded rate.

aiohttp has none of these (its keep-alive timer does not run while headers trickle in, and its
400 for a malformed header echoes the header), so the connection handler is a subclass of
aiohttp's RequestHandler; `run` replaces `web.run_app` so that the API port gets it.
What is promised is in docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import time
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .config import ServerConfig
from .errors import GatewayError
from .metrics import Metrics

log = logging.getLogger("imgproxy.listener")

# The operations port serves probes and scrapes: a few connections are plenty.
OPS_MAX_CONNECTIONS = 100
# Connections refused at the cap are kept at most REFUSAL_LINGER seconds, so that the client
# reads its 503 (closing on its unread request would reset the connection and lose the
# answer); beyond REFUSING of them at once, they are closed at once.
REFUSING = 64
REFUSAL_LINGER = 1.0
# Open files kept for everything but client and upstream connections: the operations port,
# refusals, listening sockets, the image store, state backends, log files.
RESERVED_FILES = OPS_MAX_CONNECTIONS + 2 * REFUSING + 100
# Seconds a client refused at the connection cap is asked to wait.
RETRY_AFTER = 1


class ThrottledLog:
    """At most `burst` lines per kind of event, refilled at one per `every` seconds; a line
    says how many of its kind were left out before it. A flood of bad connections must not
    become a flood of log lines (the counters have every event)."""

    def __init__(self, logger: logging.Logger, burst: int = 10, every: float = 1.0) -> None:
        self.logger, self.burst, self.every = logger, burst, every
        self._kinds: dict[str, list] = {}  # kind -> [tokens, last refill, left out]

    def warning(self, kind: str, message: str, *args) -> None:
        now = time.monotonic()
        state = self._kinds.setdefault(kind, [float(self.burst), now, 0])
        state[0] = min(self.burst, state[0] + (now - state[1]) / self.every)
        state[1] = now
        if state[0] < 1:
            state[2] += 1
            return
        state[0] -= 1
        if state[2]:
            message += f" ({state[2]} more like this were not logged)"
            state[2] = 0
        self.logger.warning(message, *args)


throttled = ThrottledLog(log)


class Listener:
    """One listening port: its limits, and its connections counted."""

    def __init__(self, name: str, max_connections: int, server: ServerConfig, metrics: Metrics) -> None:
        self.name = name
        self.max_connections = max_connections
        self.header_timeout = server.header_timeout
        self.write_timeout = server.write_timeout
        self.max_header_bytes = server.max_header_bytes
        self.open = 0
        self.refusing = 0
        self._metrics = metrics
        self._open_gauge = metrics.http_connections.labels(name)
        self._open_gauge.set_function(lambda: self.open)
        self._refused = metrics.http_connections_refused.labels(name)
        self._timed_out = metrics.http_header_timeouts.labels(name)
        self._write_timed_out = metrics.http_write_timeouts.labels(name)
        self.full_answer = _raw_response(GatewayError(
            503, "The gateway has as many open connections as it accepts; retry shortly.", type="server_error",
            code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER)},
        ))

    def refuse(self) -> asyncio.Protocol:
        self._refused.inc()
        throttled.warning("connection_cap", "%s port: refused a connection, %d are open (its cap)", self.name, self.open)
        return _Refusal(self)

    def header_timeout_passed(self, peer) -> None:
        self._timed_out.inc()
        throttled.warning("header_timeout", "%s port: closed a connection from %s that sent no complete headers within %gs", self.name, peer, self.header_timeout)

    def write_timeout_passed(self, peer) -> None:
        self._write_timed_out.inc()
        throttled.warning("write_timeout", "%s port: dropped a connection to %s that read nothing of its answer for %gs", self.name, peer, self.write_timeout)

    def parser_error(self, reason: str, peer) -> None:
        self._metrics.http_parser_errors.labels(reason).inc()
        throttled.warning("parser_error", "%s port: refused a request from %s that is not valid HTTP (%s)", self.name, peer, reason)


class _Refusal(asyncio.Protocol):
    """A connection beyond the cap: a fixed 503 and no parser, no task. What the client sends
    is read and dropped until it closes, for at most REFUSAL_LINGER seconds."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self.listener
        transport.write(listener.full_answer)
        if listener.refusing >= REFUSING:
            transport.close()
            return
        listener.refusing += 1
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.listener.refusing -= 1


def _raw_response(error: GatewayError) -> bytes:
    """A whole HTTP response for a connection aiohttp is not answering (no request object)."""
    body = json.dumps(error.envelope()).encode()
    head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in error.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# Parser refusals: the status and the text the client gets, by reason. Fixed texts: aiohttp's
# own messages quote the offending bytes (an Authorization header, for one).
PARSER_ANSWERS = {
    "header_too_large": (431, "The request's headers are larger than this gateway accepts."),
    "invalid_header": (400, "The request has a header this gateway cannot read (a forbidden character or a malformed line)."),
    "bad_method": (400, "The request does not start with an HTTP method (HTTPS sent to an HTTP port?)."),
    "bad_request_line": (400, "The request line is not valid HTTP/1.x."),
    "bad_url": (400, "The request's target is not a valid URL."),
    "bad_body": (400, "The request body's framing (Content-Length or chunked encoding) is not valid."),
    "malformed": (400, "The request is not valid HTTP."),
}


def parser_error_reason(exc: HttpProcessingError) -> str:
    """One of PARSER_ANSWERS' keys (bounded: a metric label)."""
    if isinstance(exc, LineTooLong):
        return "header_too_large"
    if isinstance(exc, InvalidHeader):
        return "invalid_header"
    if isinstance(exc, BadHttpMethod):
        return "bad_method"
    if isinstance(exc, BadStatusLine):
        return "bad_request_line"
    if isinstance(exc, InvalidURLError):
        return "bad_url"
    if isinstance(exc, PayloadEncodingError):
        return "bad_body"
    # llhttp's reason comes first, before the quoted bytes: read only that.
    what = str(exc.message).split(":", 1)[0].lower()
    if "too many headers" in what or "too large" in what or "overflow" in what:
        return "header_too_large"
    if "header" in what:
        return "invalid_header"
    if "content-length" in what or "transfer-encoding" in what or "chunk" in what:
        return "bad_body"
    return "malformed"


class HeaderTimeout(Exception):
    """A request's headers did not arrive in time (queued like a parser error)."""


class HeadersTooLarge(LineTooLong):
    def __init__(self, limit: int) -> None:
        super().__init__("request headers", str(limit))


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler, counted against its listener, with a deadline and a size
    limit for each request's headers, and the parser's refusals answered without echoing.

    Its own refusals (late or oversized headers) are queued the way aiohttp queues a parser
    error, so aiohttp's loop answers them through `handle_error` and closes the connection.
    """

    __slots__ = ("_listener", "_counted", "_deadline", "_header_bytes", "_last_payload", "_refusing", "_write_stall")

    def __init__(self, manager: web.Server, listener: Listener, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        # Counted when made (not when the transport reports in, a loop turn later), so that a
        # burst of accepts cannot overshoot the cap.
        listener.open += 1
        self._counted = True
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._last_payload = None  # the body of the last request parsed
        self._refusing = False
        self._write_stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._listener.open -= 1
        self._stop_waiting()
        self._stop_stall_timer()
        self._last_payload = None  # it refers back to this handler
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The client's socket is full: it is not reading. One that does not read again within
        # write_timeout would hold its answer (and its share of the upstream budget) for good.
        super().pause_writing()
        if self._write_stall is None:
            self._write_stall = self._loop.call_later(self._listener.write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_stall_timer()

    def _stop_stall_timer(self) -> None:
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None

    def _write_stalled(self) -> None:
        self._write_stall = None
        self._listener.write_timeout_passed(self._peer())
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return  # the answer is queued; what follows is not read
        parsed, body = self._request_count, self._last_payload
        waiting = self._deadline is not None
        # Bytes that are no request's body begin the next request (on a kept-alive
        # connection, or pipelined behind one still being handled).
        starting = not waiting and data and (body is None or body.is_eof())
        super().data_received(data)
        new = self._request_count - parsed
        if starting:
            waiting = True
            self._header_bytes = 0
            if not new:  # a request whose headers come whole in one read (most do) needs no timer
                self._await_headers()
        limit = self._listener.max_header_bytes
        if new and body is not None and not body.is_eof() and isinstance(self._messages[-1][0], _ErrInfo):
            self._body_broke(body, self._messages.pop()[0].exc)
        elif new:
            # Headers complete (or refused by the parser): the body and the handler have their own limits.
            if self._deadline is not None:
                self._stop_waiting()
            self._last_payload = self._messages[-1][1] if self._messages else None
            # _header_size is at most 5/4 of the bytes it stands for (a header line is at least
            # 4 bytes, estimated 1 too many): from fewer bytes than half the limit, none is over it.
            if waiting and self._header_bytes + len(data) > limit // 2 and any(
                _header_size(message) > limit for message, _ in list(self._messages)[-new:]
            ):
                for _ in range(new):
                    self._messages.pop()  # not handled: answered with 431 instead
                self._refuse(HeadersTooLarge(limit))
        elif waiting:
            self._header_bytes += len(data)
            if self._header_bytes > limit and self._between_requests():
                self._refuse(HeadersTooLarge(limit))

    def _body_broke(self, body, exc: Exception) -> None:
        """A request body's framing broke (a bad chunk size, say). aiohttp would queue a 400
        behind the request and leave the handler waiting for the rest of the body forever:
        fail the handler's read instead, and close the connection after its answer."""
        reason = parser_error_reason(exc)
        self._listener.parser_error(reason, self._peer())
        if self._request_in_progress:
            body.set_exception(GatewayError(PARSER_ANSWERS[reason][0], PARSER_ANSWERS[reason][1], code="bad_http_request"))
        body.feed_eof()  # also ends aiohttp's wait for an unread body after an answer
        self._refusing = True
        self.close()

    def _peer(self) -> str | None:
        peer = self.peername
        return str(peer[0]) if isinstance(peer, (tuple, list)) else peer

    def _body_done(self) -> bool:
        body = self._last_payload
        return body is None or body.is_eof()

    def _between_requests(self) -> bool:
        """No request being received or handled: an answer now cannot cut into another one."""
        return not self._request_in_progress and not self._messages and self._body_done()

    def _await_headers(self) -> None:
        self._header_bytes = 0
        self._deadline = self._loop.call_later(self._listener.header_timeout, self._headers_late)

    def _stop_waiting(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport is None or self._force_close or self._refusing:
            return
        if not self._between_requests():
            # Pipelined bytes behind a request still being handled: judge them once it is done.
            self._await_headers()
            return
        self._listener.header_timeout_passed(self._peer())
        self._refuse(HeaderTimeout())

    def _refuse(self, exc: Exception) -> None:
        self._stop_waiting()
        self._refusing = True
        self._messages.append((_ErrInfo(status=400, exc=exc, message=""), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, HeaderTimeout):
            text = f"The request's headers did not arrive within {self._listener.header_timeout:g} seconds."
            answer = GatewayError(408, text, code="request_timeout")
        elif isinstance(exc, HttpProcessingError):
            # aiohttp would log the error with its text at ERROR and send that text back.
            reason = parser_error_reason(exc)
            self._listener.parser_error(reason, request.remote)
            answer = GatewayError(PARSER_ANSWERS[reason][0], PARSER_ANSWERS[reason][1], code="bad_http_request")
        else:
            return super().handle_error(request, status, exc, message)
        response = answer.to_response()
        response.force_close()
        return response


def _header_size(message) -> int:
    """About the bytes of a parsed request line and headers (0 for a parser error)."""
    if not isinstance(message, RawRequestMessage):
        return 0
    return len(message.method) + len(message.path) + 12 + sum(len(name) + len(value) + 4 for name, value in message.raw_headers)


class GuardedServer(web.Server):
    """aiohttp's Server making GuardedHandlers, and a fixed 503 beyond the listener's cap."""

    def __init__(self, listener: Listener, plain: web.Server) -> None:
        super().__init__(
            plain.request_handler, request_factory=plain.request_factory, handler_cancellation=plain.handler_cancellation, **plain._kwargs
        )
        self.listener = listener

    def __call__(self) -> asyncio.Protocol:
        listener = self.listener
        if listener.open >= listener.max_connections:
            return listener.refuse()
        return GuardedHandler(self, listener, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections are guarded by `listener`."""

    def __init__(self, app: web.Application, listener: Listener, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self.listener = listener

    async def _make_server(self) -> web.Server:
        return GuardedServer(self.listener, await super()._make_server())


def fit_connections(wanted: int) -> int:
    """Raise the soft open-file limit to the hard one, and lower the connection cap to what it
    allows: two descriptors per connection (the client's and an upstream's) besides
    RESERVED_FILES. Running out of descriptors is what takes every port down, probes too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return wanted
    fits = max(1, (soft - RESERVED_FILES) // 2)
    if wanted > fits:
        log.warning("server.max_connections lowered from %d to %d: the process may open only %d files (ulimit -n)", wanted, fits, soft)
        return fits
    return wanted


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    # asyncio logs a failed accept() up to `backlog` times per loop turn (tens of thousands of
    # lines a second once descriptors run out): keep a few.
    if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
        throttled.warning("accept", "cannot accept connections: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


def api_runner(app: web.Application, server: ServerConfig, metrics: Metrics, *, shutdown_timeout: float) -> "GuardedRunner":
    """The runner of the API port: its connections guarded by a listener with the configured cap."""
    listener = Listener("api", fit_connections(server.max_connections), server, metrics)
    asyncio.get_event_loop().set_exception_handler(_quiet_accept_errors)
    return GuardedRunner(
        app, listener, handle_signals=False, shutdown_timeout=shutdown_timeout, keepalive_timeout=server.keepalive_timeout, access_log=None
    )
