"""The downstream relay: an upstream answer copied to the client as it arrives, checked on the
way (a JSON images answer) or watched (server-sent events) so usage can be recorded."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
from aiohttp import web

from . import untrusted_json
from .errors import GatewayError, upstream_error
from .inline_images import AnswerCheck, InlineImageError
from .messages import RequestContext, StreamedReply, token_usage
from .upstream import MAX_JSON_BYTES, _limited_chunks

log = logging.getLogger("imgproxy.upstream")


class StreamTap:
    """Watches bytes that are streamed through, so usage can be recorded without holding them.

    Counts images (`"b64_json"` keys, or completed events of a stream) and keeps the last
    `usage` object seen. Never copies a whole chunk: only its edges are kept.
    """

    USAGE = b'"usage"'
    TAIL = 4096
    # The events that carry a finished image, of either operation: an upstream that answers an
    # edit with image_generation.* events (or the reverse) still has its images counted, cut
    # at n and billed.
    COMPLETED = (b'"image_generation.completed"', b'"image_edit.completed"')

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.markers = self.COMPLETED if sse else (b'"b64_json"',)
        self.images = 0
        self.usage: dict | None = None
        self._keep = max(map(len, self.markers)) - 1
        self._edge = b""  # the last _keep bytes: a marker may straddle two chunks
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        # Markers that straddle: they start in the edge and end in this chunk.
        edge, head = len(self._edge), self._edge + chunk[: self._keep]
        for marker in self.markers:
            at = head.find(marker)
            while 0 <= at < edge:
                self.images += at + len(marker) > edge
                at = head.find(marker, at + 1)
        # Hop from quote to quote (find of one byte is a memchr): base64 runs hold no quotes,
        # so this is ten times faster than counting the marker across the whole chunk.
        markers, at = self.markers, chunk.find(b'"')
        while at != -1:
            if chunk.startswith(markers, at):
                self.images += 1
            at = chunk.find(b'"', at + 1)
        self._edge = (self._edge + chunk[-self._keep :])[-self._keep :]
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
                await _send(ctx, out, _events_before(chunk, tap.markers, ctx.request.n - before))
                break
            await _send(ctx, out, chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, asyncio.TimeoutError) as exc:
        log.warning("upstream broke off a streamed answer (request %s)", ctx.request_id)
        if isinstance(exc, asyncio.TimeoutError):  # it stalled past the call's time: a timeout, as for JSON answers
            ctx.outcome.error_code, ctx.outcome.upstream_error_kind = "upstream_timeout", "timeout"
            error = GatewayError(504, "The provider stopped sending the stream in time.", type="server_error", code="upstream_timeout")
        else:
            ctx.outcome.error_code, ctx.outcome.upstream_error_kind = "upstream_bad_response", "bad_body"
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
        # A read that ran out of time is a timeout in the record and the metrics, not a bad body.
        timed_out = isinstance(exc, asyncio.TimeoutError)
        ctx.outcome.error_code = "upstream_timeout" if timed_out else "upstream_bad_response"
        ctx.outcome.upstream_error_kind = "timeout" if timed_out else "bad_body"
        check.images, check.usage = delivered, None
        if ctx.http.transport is not None:
            # The status is out: dropping the connection is the only way left to say "failed".
            ctx.http.transport.close()
        return out
    await out.write_eof()
    return out


def _bad_answer(ctx: RequestContext, exc: Exception) -> GatewayError:
    log.warning("upstream sent a bad or broken answer (request %s): %s", ctx.request_id, exc)
    return upstream_error(f"The provider '{ctx.target.provider.name}' returned an answer that is not a valid images response.")


def _events_before(chunk: bytes, markers: tuple[bytes, ...], allowed: int) -> bytes:
    """The events of `chunk` before the one that carries its (allowed + 1)-th marker."""
    at = -1
    for _ in range(allowed + 1):
        found = [i for i in (chunk.find(marker, at + 1) for marker in markers) if i >= 0]
        if not found:  # the marker straddled two reads: nothing of this one is sent
            return b""
        at = min(found)
    end = chunk.rfind(b"\n\n", 0, at)
    return chunk[: end + 2] if end >= 0 else b""


async def _send(ctx: RequestContext, out: web.StreamResponse, chunk: bytes) -> None:
    await out.write(chunk)
    ctx.outcome.bytes_sent += len(chunk)


async def _relay(ctx: RequestContext, out: web.StreamResponse, tap: StreamTap, chunk: bytes) -> None:
    tap.feed(chunk)
    await out.write(chunk)
    ctx.outcome.bytes_sent += len(chunk)
