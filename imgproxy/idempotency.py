"""The `Idempotency-Key` request header: a retry gets the first answer, not a second upstream
call and not a second charge, on whichever replica it lands.

Records live in the state backend under (client key name, header value). The first request
stores `in_progress` (set-if-absent, so only one request proceeds); its answer (status, body,
headers) replaces it for `idempotency.ttl` seconds. A retry with the same body gets that
answer back with `x-imgproxy-idempotent-replay: true`; with another body, 409
`idempotency_key_reused`; while the first still runs, it waits up to `idempotency.wait`
seconds, then 409 `request_in_progress`. Answers that cannot be replayed (streamed, larger than
`max_answer_bytes`, or broken off after the upstream call) leave a marker: their retries get 409
`idempotent_answer_unavailable`, never a second upstream call. A request refused before the
upstream call, or by the provider's own rate limit (429), leaves nothing, so its retry is
decided afresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time

from aiohttp import web

from .config import IdempotencyConfig
from .errors import GatewayError
from .messages import RequestContext
from .state import State, StateUnavailable

log = logging.getLogger("imgproxy.idempotency")

HEADER = "Idempotency-Key"
REPLAY_HEADER = "x-imgproxy-idempotent-replay"
_VALID = re.compile(r"^[\x21-\x7e]{1,255}$")
POLL = 0.1  # seconds between looks at a request still in progress
MARGIN = 60.0  # an in-progress mark outlives the model's timeout by this much
RETRY_INTERVAL = 0.5  # seconds between tries to keep answers while the state backend is away
# Answers waiting to be kept are held up to this many bytes; beyond it only their marker
# (retries get 409 idempotent_answer_unavailable): still never a second upstream call.
UNKEPT_MAX_BYTES = 64 * 1024 * 1024


def fingerprint(ctx: RequestContext) -> str:
    """The request as a digest: its operation, its body and the bytes of every uploaded image."""
    request = ctx.request
    seen = {"operation": request.operation, "body": ctx.body}
    if request.form is not None:
        seen["images"] = [upload.digest for upload in request.form.images]
        seen["mask"] = request.form.mask.digest if request.form.mask else None
    return hashlib.sha256(json.dumps(seen, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Idempotency:
    def __init__(self, state: State, config: IdempotencyConfig) -> None:
        self.state = state
        self.config = config
        # Records the backend could not take when their request ended (key → record), kept
        # until it is back: an in-progress mark lost or expired meanwhile must not let a retry
        # make a second paid call.
        self.unkept: dict[str, bytes] = {}
        self._keeper: asyncio.Task | None = None

    async def begin(self, ctx: RequestContext) -> web.Response | None:
        """None: go ahead (and call `finish` afterwards); else the stored answer to replay."""
        given = ctx.http.headers.get(HEADER)
        if given is None:
            return None
        if not _VALID.match(given):
            raise GatewayError(400, f"The {HEADER} header must be 1 to 255 printable ASCII characters.", code="invalid_idempotency_key")
        key = f"idem:{{{ctx.identity.name}}}:{hashlib.sha256(given.encode()).hexdigest()}"
        body = fingerprint(ctx)
        model = ctx.route.model
        # Retries and fallbacks run until the model's deadline: the mark must outlive them all.
        running_ttl = (model.deadline or model.timeout or ctx.route.provider.total_timeout) + MARGIN
        mark = json.dumps({"state": "in_progress", "body": body}).encode()
        give_up = time.monotonic() + self.config.wait
        while True:
            found = await self.state.put_new(key, mark, running_ttl)
            if found is None:
                ctx.scratch["idempotency"] = (key, body)
                # Read the answer whole (not streamed through) so that it can be kept; a client
                # that asked for `stream` still gets a stream, and its retry a 409.
                ctx.needs_body = True
                return None
            record = json.loads(found)
            if record["body"] != body:
                raise GatewayError(
                    409, f"This {HEADER} was already used with a different request body; use a new key for a new request.",
                    code="idempotency_key_reused",
                )
            if record["state"] == "done":
                headers = {**record["headers"], REPLAY_HEADER: "true"}
                return web.Response(status=record["status"], body=record["answer"].encode(), headers=headers)
            if record["state"] == "unavailable":
                raise GatewayError(
                    409, f"The request with this {HEADER} was already sent upstream, but its answer was not kept "
                    "(streamed, too large, or broken off); it is not sent again.",
                    code="idempotent_answer_unavailable",
                )
            if time.monotonic() >= give_up:
                raise GatewayError(
                    409, f"A request with this {HEADER} is still in progress; retry later.",
                    code="request_in_progress", headers={"Retry-After": "1"}, should_retry=True,
                )
            await asyncio.sleep(POLL)

    async def finish(self, ctx: RequestContext, response: web.StreamResponse | None) -> None:
        """Keep the answer for retries. Never raises: the client has its answer already."""
        started = ctx.scratch.pop("idempotency", None)
        if started is None:
            return
        key, body = started
        try:
            refused_before = not ctx.outcome.upstream_called and (response is None or response.status >= 400)
            # A 429 after the call is the provider's rate limit: nothing was generated or billed,
            # and its Retry-After asks for the retry that a replay would refuse for `ttl`.
            if refused_before or (response is not None and response.status == 429):
                await self.state.delete(key)  # retry decides afresh
                return
            answer = response.body if isinstance(response, web.Response) else None
            if not isinstance(answer, bytes) or len(answer) > self.config.max_answer_bytes:
                record = {"state": "unavailable", "body": body}
            else:
                headers = {"Content-Type": response.content_type, **ctx.response_headers}
                record = {"state": "done", "body": body, "status": response.status, "headers": headers, "answer": answer.decode()}
            value = json.dumps(record).encode()
            try:
                await self.state.put(key, value, self.config.ttl)
            except StateUnavailable:
                self.keep_later(key, value, body)
        except Exception:
            log.exception("could not keep the answer of request %s for its Idempotency-Key", ctx.request_id)

    def keep_later(self, key: str, value: bytes, body: str) -> None:
        held = sum(map(len, self.unkept.values()))
        if held + len(value) > UNKEPT_MAX_BYTES:
            value = json.dumps({"state": "unavailable", "body": body}).encode()
        self.unkept[key] = value
        log.warning("the state backend is away: %d Idempotency-Key answer(s) kept in memory until it is back", len(self.unkept))
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_when_back())

    async def _keep_when_back(self) -> None:
        while self.unkept:
            await asyncio.sleep(RETRY_INTERVAL)
            await self._put_unkept()

    async def _put_unkept(self) -> None:
        for key, value in list(self.unkept.items()):
            try:
                await self.state.put(key, value, self.config.ttl)
            except StateUnavailable:
                return
            self.unkept.pop(key, None)

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        await self._put_unkept()
        if self.unkept:
            log.error("%d Idempotency-Key answer(s) could not be kept (the state backend is away): their retries may be sent upstream again", len(self.unkept))
