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
from .state import State

log = logging.getLogger("imgproxy.idempotency")

HEADER = "Idempotency-Key"
REPLAY_HEADER = "x-imgproxy-idempotent-replay"
_VALID = re.compile(r"^[\x21-\x7e]{1,255}$")
POLL = 0.1  # seconds between looks at a request still in progress
MARGIN = 60.0  # an in-progress mark outlives the model's timeout by this much


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
            await self.state.put(key, json.dumps(record).encode(), self.config.ttl)
        except Exception:
            log.exception("could not keep the answer of request %s for its Idempotency-Key", ctx.request_id)
