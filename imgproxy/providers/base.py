"""The small interface every provider adapter implements."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

from .. import schemafiles
from ..config import ProviderConfig
from ..errors import GatewayError, UpstreamError, upstream_error
from ..messages import ImageRequest, ImagesResult, StreamedReply
from ..redaction import redact

if TYPE_CHECKING:
    from ..plan import Plan
    from ..routing import Target
    from ..upstream import Upstream, UpstreamCall

log = logging.getLogger("imgproxy.upstream")

# What of an upstream's error body may reach the client: a code or type that is a plain word,
# a param that names one of our request parameters. Anything else is dropped, never copied.
_PLAIN_WORD = re.compile(r"[a-z0-9_.-]{1,64}")
REQUEST_PARAMS = frozenset(schemafiles.load("image-generation-request.schema.json")["properties"])


def request_param(value) -> str | None:
    return value if isinstance(value, str) and value in REQUEST_PARAMS else None


DEFAULT_MAX_PARALLEL = 4
# One upstream call: the request with the n of that call, and the call's handle (its time is
# what is left of the attempt's when its turn comes).
OneCall = Callable[[ImageRequest, "UpstreamCall"], Awaitable[ImagesResult]]


class Provider:
    """Translates an ImageRequest into one upstream's wire format and its answer back.

    `generate(request, target, plan, call)` gets the validated request, the target (model and
    provider config of this attempt), the core's `Plan` (format to ask for, whether the answer
    may stream through, whether to decode base64 while reading) and the attempt's
    `UpstreamCall`. It returns an ImagesResult (parsed) or, when `plan.stream_through` allows,
    a StreamedReply that owns the upstream response. It raises GatewayError for every
    failure; UpstreamError (imgproxy.errors) when the provider failed.

    `models` is the adapter's catalog: per model its capabilities and price, each with its
    source and date (see `imgproxy.catalog.load_models`).
    """

    type: ClassVar[str]
    needs_key: ClassVar[bool] = True
    models: ClassVar[dict] = {}

    def __init__(self, config: ProviderConfig, upstream: "Upstream") -> None:
        self.config = config
        self.upstream = upstream
        # Upstream calls of one request in flight at once when its n is fanned out.
        self.max_parallel = int((config.options or {}).get("max_parallel", DEFAULT_MAX_PARALLEL))

    async def generate(
        self, request: ImageRequest, target: "Target", plan: "Plan", call: "UpstreamCall"
    ) -> ImagesResult | StreamedReply:
        raise NotImplementedError

    async def edit(self, request: ImageRequest, target: "Target", plan: "Plan", call: "UpstreamCall") -> ImagesResult | StreamedReply:
        """An edit: `request.form` holds the input images (and mask) the core checked against
        the model's `edits` capabilities. Adapters that edit override this."""
        raise self.cannot("image edits", request.model)

    async def vary(self, request: ImageRequest, target: "Target", plan: "Plan", call: "UpstreamCall") -> ImagesResult | StreamedReply:
        """A variation of `request.form.images[0]`. Adapters that make variations override this."""
        raise self.cannot("image variations", request.model)

    def cannot(self, operation: str, model: str) -> GatewayError:
        # A model described with edits/variations capabilities its adapter does not implement.
        return GatewayError(
            400, f"The model '{model}' is served by the provider '{self.config.name}' ({self.type}), which does not do {operation}.",
            param="model", code="unsupported_operation",
        )

    def upstream_error_for_status(self, status: int, error_body: bool = False) -> GatewayError:
        """The error for an upstream status the adapter has no better reading of. `error_body`:
        the provider said, in its own error format, that it failed (so it generated nothing)."""
        if status in (401, 403):
            return self.credentials_rejected(status)
        if status == 404:
            return upstream_error(
                f"The provider '{self.config.name}' does not know the model it was asked for; check upstream_model.",
                code="upstream_model_not_found", kind="not_found", produced_nothing=True,
            )
        log.warning("provider %s answered HTTP %s", self.config.name, status)
        if status == 408:
            kind = "timeout"
        else:
            kind = "5xx" if status >= 500 else "4xx"
        return upstream_error(
            f"The provider '{self.config.name}' failed with HTTP {status}.", code="upstream_error", kind=kind,
            produced_nothing=status == 408 or (status >= 500 and error_body),
        )

    def require_key(self, model: str) -> str:
        if self.config.api_key:
            return self.config.api_key
        where = " or ".join(self.config.api_key_vars) or f"providers.{self.config.name}.api_key in the config"
        raise GatewayError(
            503,
            f"The model '{model}' is served by the provider '{self.config.name}', which has no API key configured. "
            f"Set {where} in imgproxy's environment.",
            type="server_error",
            code="provider_not_configured",
        )

    def redact(self, text) -> str:
        """Upstream text that may reach a client or a log line: no trace of the provider key
        or of anything shaped like a credential, and bounded (see imgproxy.redaction)."""
        return redact(str(text), (self.config.api_key,))

    def plain_word(self, value) -> str | None:
        """An upstream's `code` or `type` if it is a short plain word with nothing of a key in it."""
        if isinstance(value, str) and _PLAIN_WORD.fullmatch(value) and self.redact(value) == value:
            return value
        return None

    def upstream_message(self, message, status: int) -> str:
        """An upstream error's message, fit to show: a string, redacted; else a neutral one."""
        if not isinstance(message, str) or not message.strip():
            return f"The provider '{self.config.name}' refused the request with HTTP {status}."
        return self.redact(message)

    def credentials_rejected(self, status: int) -> GatewayError:
        # The client did nothing wrong: the operator's key is bad, revoked or lacks access.
        log.error(
            "provider %s rejected imgproxy's credentials (HTTP %s): check its API key", self.config.name, status
        )
        return upstream_error(
            f"The provider '{self.config.name}' rejected this gateway's credentials; the operator has been told.",
            code="upstream_auth_failed", kind="auth", produced_nothing=True,
        )

    def fan_out(self, request: ImageRequest, target: "Target", call: "UpstreamCall", one: OneCall) -> Awaitable[ImagesResult]:
        """The request's n images from as many upstream calls as the model's `max_n_per_call`
        needs (one call, as it is, when it takes them all), at most `max_parallel` in flight,
        all within the attempt's time; their images merged and their usage summed.

        Every call is awaited to its end, failed or not: an image already paid for is kept and
        delivered. Calls that failed deliver nothing and are billed nothing here; an adapter
        whose provider bills a call that failed after it was accepted (BFL's jobs) counts it
        in `call.outcome.undelivered_billed` itself. If no call delivered, the error that says
        most: a refusal first (the same request would be refused again), then a failure that
        may have produced something (so that it is not tried again), else the first."""
        per_call = target.model.capabilities.n_per_call
        if request.n <= per_call:
            return one(request, call)  # awaited by the caller: no extra frame on the common path
        return self._fan_out(request, per_call, call, one)

    async def _fan_out(self, request: ImageRequest, per_call: int, call: "UpstreamCall", one: OneCall) -> ImagesResult:
        counts = [per_call] * (request.n // per_call) + ([request.n % per_call] if request.n % per_call else [])
        gate = asyncio.Semaphore(self.max_parallel)
        deadline = time.monotonic() + call.timeout  # the attempt's time, shared by all its calls

        async def run(n: int) -> ImagesResult:
            async with gate:
                left = deadline - time.monotonic()
                if left <= 0:  # never sent: nothing generated
                    raise upstream_error(
                        f"The provider '{self.config.name}' did not answer within {call.timeout:g} seconds.",
                        status=504, code="upstream_timeout", kind="timeout", produced_nothing=True,
                    )
                sub_call = type(call)(call.upstream, call.request_id, call.traceparent, left, call.outcome)
                return await one(replace(request, n=n), sub_call)

        results = await asyncio.gather(*(run(n) for n in counts), return_exceptions=True)
        return self.merge(results, counts, call)

    def merge(self, results: list, counts: list[int], call: "UpstreamCall") -> ImagesResult:
        answers = [r for r in results if isinstance(r, ImagesResult)]
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, GatewayError):
                # Not a provider failure (a defect, a cancelled call): the request fails, but
                # the images other calls delivered were paid for and stay in the record.
                call.outcome.undelivered_billed += sum(len(a.images) for a in answers)
                raise error
        # Images a content filter withheld, counted as the provider's filtered ones.
        refused = [(e, n) for e, n in zip(results, counts) if isinstance(e, GatewayError) and e.code in POLICY_CODES]
        filtered = sum(a.filtered for a in answers) + sum(n for _, n in refused)
        images = [image for answer in answers for image in answer.images]
        if errors:
            log.warning(
                "provider %s: %d of %d calls failed (%s); %d images delivered",
                self.config.name, len(errors), len(results), ", ".join(sorted({e.code or "error" for e in errors})), len(images),
            )
        if images:
            usages = [a.usage for a in answers if a.images]
            return ImagesResult(
                created=max(a.created for a in answers), images=images,
                usage=summed(usages) if all(u is not None for u in usages) else None,
                extra=answers[0].extra if answers else {}, filtered=filtered,
            )
        if not errors:
            raise upstream_error(f"The provider '{self.config.name}' generated no image.")
        refusals = [e for e in errors if not isinstance(e, UpstreamError)]
        if refusals:
            raise refusals[0]
        maybe_billed = [e for e in errors if not e.produced_nothing]
        if maybe_billed:
            raise maybe_billed[0]
        raise errors[0]


# Refusals that mean a content filter withheld a call's images.
POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})


def summed(usages: list[dict]) -> dict:
    """Token counts of several calls added up, key by key (nested counts too)."""
    total: dict = {}
    for usage in usages:
        for name, value in usage.items():
            if isinstance(value, dict):
                total[name] = summed([total.get(name) or {}, value])
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                total[name] = total.get(name, 0) + value
    return total
