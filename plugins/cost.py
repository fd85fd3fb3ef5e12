"""Cost metering and budgets.

Before the upstream call, the worst case a request can cost is reserved against the key's
daily, monthly and per-minute spend (refused with 429 `insufficient_quota` if a budget would
be crossed); afterwards the reservation is settled to what was really delivered: images delivered (at
most n) times their price, or the upstream's token `usage`, bounded by the worst case. Every
finished request is written as a usage record (JSON lines) for billing export, and the
`x-imgproxy-cost-usd` header of a response that is not streamed carries the same cost.

The reservation is durable: a pending record (request id, key, model, worst case, time) is
stored with it in the state and dropped when it is settled. A replica that dies mid-call
leaves its records behind; once past the model's timeout plus `state.recovery_margin`, any
live replica's sweeper claims each (one replica only) and writes it as a usage record at its
worst case, marked `"settled_by": "recovery"`. A settlement that cannot reach the state is
kept and retried by the sweeper; its usage record is written once it is settled.

Usage records are JSON lines; each is flushed to the operating system as it is written (it
survives the process dying, not the machine: there is no fsync per record).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from imgproxy.catalog import CUSTOM_SIZE
from imgproxy.config import ConfigError
from imgproxy.errors import GatewayError
from imgproxy.hookspecs import hookimpl
from imgproxy.inline_images import valid_usage
from imgproxy.state import Pending, Reservation, StateUnavailable

log = logging.getLogger("imgproxy.cost")

_table = {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}}}
PRICE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,  # an empty price would meter at $0 unnoticed
    "properties": {
        "per_image": {**_table, "description": "USD per image: {quality: {size: price}}, * for any."},
        "per_image_credits": {**_table, "description": "As per_image, in provider credits (see credit_usd)."},
        "per_megapixel": {
            "type": "object",
            "additionalProperties": False,
            "required": ["first", "additional", "max_megapixels"],
            "description": "USD by output size (FLUX.2): `first` for the first megapixel, `additional` for each further one started (1 MP = 1024x1024 pixels); an unknown size counts as `max_megapixels`.",
            "properties": {
                "first": {"type": "number", "minimum": 0},
                "additional": {"type": "number", "minimum": 0},
                "max_megapixels": {"type": "integer", "minimum": 1},
            },
        },
        "per_million_tokens": {
            "type": "object",
            "additionalProperties": False,
            "required": ["text_input", "image_input", "output"],
            "properties": {k: {"type": "number", "minimum": 0} for k in ("text_input", "image_input", "output")},
        },
    },
}
SECTION_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "prices": {"type": "object", "additionalProperties": PRICE_SCHEMA, "description": "By public model name or upstream model; replaces the provider's published price."},
        "credit_usd": {"type": "number", "exclusiveMinimum": 0, "description": "USD per provider credit (Stability: 0.01)."},
        "usage_log": {"type": "string", "description": "Where usage records go: `stdout`, a file path (appended), or empty for nowhere."},
    },
}
KEY_SETTINGS = {
    "budget": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "daily_usd": {"type": "number", "minimum": 0, "description": "Per UTC day."},
            "monthly_usd": {"type": "number", "minimum": 0, "description": "Per UTC calendar month."},
            "usd_per_minute": {"type": "number", "minimum": 0},
        },
    }
}

FREE = {"per_image": {"*": {"*": 0.0}}}

TOKEN_ESTIMATE_CHARS = 2  # worst case for the prompt's tokens: one token per two characters
# Worst case for the tokens of one input image of an edit (or its mask). A bound on what an
# upstream's usage may bill, not a price: OpenAI counts a 1024x1024 input at about 3,000
# tokens with input_fidelity high, fewer with low.
INPUT_IMAGE_TOKENS_MAX = 8192


@dataclass(frozen=True)
class Price:
    per_image: dict  # {quality: {size: usd}}
    per_token: dict | None  # USD per million tokens
    per_megapixel: dict | None = None  # {first, additional, max_megapixels}: USD by output size
    _known: dict = field(default_factory=dict, compare=False)

    def image(self, quality: str | None, size: str | None) -> float:
        """The price of one image; for `auto` (or an unlisted) quality or size, the highest it could be."""
        key = (quality, size)
        price = self._known.get(key)
        if price is None:
            price = self._known[key] = self._image(quality, size)
        return price

    def _image(self, quality: str | None, size: str | None) -> float:
        if self.per_megapixel:
            return megapixel_price(self.per_megapixel, size)
        tables = [_exact(self.per_image, quality)] if _exact(self.per_image, quality) else list(self.per_image.values())
        prices = []
        for table in tables:
            price = _exact(table, size)
            prices.extend([price] if price is not None else table.values())
        return max(prices, default=0.0)

    def tokens(self, usage: dict) -> float:
        details = usage.get("input_tokens_details") or {}
        image_in = details.get("image_tokens", 0)
        text_in = details.get("text_tokens", usage.get("input_tokens", 0) - image_in)
        p = self.per_token
        return (text_in * p["text_input"] + image_in * p["image_input"] + usage.get("output_tokens", 0) * p["output"]) / 1e6


def megapixel_price(price: dict, size: str | None) -> float:
    """The first megapixel's price plus each further one started; 1 MP is 1024x1024 pixels
    (so 1920x1080 is 2). A size that is not WIDTHxHEIGHT counts as the largest."""
    match = CUSTOM_SIZE.fullmatch(size or "")
    megapixels = -(-int(match[1]) * int(match[2]) // 2**20) if match else price["max_megapixels"]
    return price["first"] + max(megapixels - 1, 0) * price["additional"]


def _exact(table: dict, name: str | None):
    return table.get(name) if name in table else table.get("*")


class CostPlugin:
    def __init__(self) -> None:
        self.prices: dict[str, Price] = {}
        self.free: set[str] = set()  # models metered at $0 on purpose (models.X.free, a catalog's free: true)
        self.usage_log = None
        self._usage_target = ""
        self.unsettled: list[tuple[dict, float, dict]] = []  # (scratch, cost, usage record) to settle again
        self._sweeper: asyncio.Task | None = None

    @hookimpl
    def imgproxy_key_schema(self):
        return KEY_SETTINGS

    @hookimpl
    def imgproxy_config_schema(self):
        return {"cost": SECTION_SCHEMA}

    @hookimpl
    def imgproxy_configure(self, gateway):
        section = gateway.config.sections.get("cost", {})
        overrides = section.get("prices", {})
        credit = section.get("credit_usd", 0.01)
        # The providers' published prices (their catalog entries), under the operator's overrides.
        published = {name: entry.price for name, entry in gateway.catalog.items() if entry.price is not None}
        for model in gateway.config.models.values():
            names = (model.name, model.upstream_model, model.catalog)
            override = next((overrides[name] for name in names if name in overrides), None)
            if model.free and override is not None:
                raise ConfigError(gateway.config.source, ["models", model.name, "free"], "the model is also priced under cost.prices: keep one of the two")
            spec = FREE if model.free else override if override is not None else next((published[name] for name in names if name in published), None)
            # A model nobody priced would be metered at $0 unnoticed (budgets never reached, bills
            # unexplained): that is a config error, not a default.
            if spec is None:
                raise ConfigError(
                    gateway.config.source, ["models", model.name],
                    f"no price for model {model.name!r}: add it under cost.prices.{model.name} (per_image, per_image_credits, "
                    f"per_megapixel or per_million_tokens), or set models.{model.name}.free: true to meter it at $0 on purpose",
                )
            if model.free or spec.get("free"):
                self.free.add(model.name)
                spec = FREE
            per_image = spec.get("per_image") or {
                q: {s: credits * credit for s, credits in sizes.items()} for q, sizes in spec.get("per_image_credits", {}).items()
            }
            self.prices[model.name] = Price(per_image, spec.get("per_million_tokens"), spec.get("per_megapixel"))
            if spec.get("per_million_tokens"):
                gateway.body_needed.add(model.name)  # token usage is in the body: read it before answering
        self._usage_target = section.get("usage_log", "")

    @hookimpl
    def imgproxy_startup(self, gateway):
        if self._usage_target == "stdout":
            self.usage_log = sys.stdout
        elif self._usage_target:
            self.usage_log = open(self._usage_target, "a", encoding="utf-8")  # noqa: SIM115 (closed at shutdown)
        self._sweeper = asyncio.create_task(self.recover_forever(gateway))

    @hookimpl
    async def imgproxy_shutdown(self, gateway):
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
            await self.retry_settlements(gateway.state, last=True)
        if self.usage_log not in (None, sys.stdout):
            self.usage_log.close()
        self.usage_log = None

    @hookimpl
    async def imgproxy_check_limits(self, ctx):
        request = ctx.request
        worst = self.worst(ctx, request.n)
        budget = ctx.identity.settings.get("budget", {})
        periods = spend_periods(ctx.identity.name, int(time.time() // 60))
        reservations = [Reservation(key, worst, budget.get(setting), ttl) for setting, key, ttl, _ in periods]
        model = ctx.route.model  # all attempts, fallbacks included, end by the model's deadline
        deadline = (model.deadline or model.timeout or ctx.route.provider.total_timeout) + ctx.gateway.config.state.recovery_margin
        pending = Pending(ctx.identity.name, os.urandom(12).hex(), self.pending_record(ctx, worst), deadline)
        failed = await ctx.gateway.state.reserve(reservations, pending)
        if failed is not None:
            setting, key, _, resets = periods[failed]
            spent = await ctx.gateway.state.get(key)
            raise GatewayError(
                429,
                f"The API key '{ctx.identity.name}' has spent ${spent:.2f} of its {BUDGET_NAMES[setting]} budget of "
                f"${budget[setting]:.2f} and this request could cost up to ${worst:.4f}; the budget resets at {resets}.",
                type="insufficient_quota",
                code="insufficient_quota",
            )
        ctx.scratch["cost"] = {"reserved": worst, "keys": [(key, ttl) for _, key, ttl, _ in periods], "pending": pending}

    @hookimpl
    async def imgproxy_change_target(self, ctx, previous):
        # The previous target produced nothing: release its reservation, reserve the fallback's.
        scratch = ctx.scratch.pop("cost", None)
        if scratch is None:
            return
        try:
            await self.settle(ctx.gateway.state, scratch, 0.0, {})
        except StateUnavailable:
            self.unsettled.append((scratch, 0.0, None))  # the sweeper releases it
        await self.imgproxy_check_limits(ctx)

    @hookimpl
    async def imgproxy_record_usage(self, ctx, outcome):
        scratch = ctx.scratch.get("cost")
        cost = 0.0
        if scratch is not None:
            # Cut short after the call (a shutdown's drain timeout): the provider bills it all.
            cost = scratch["reserved"] if outcome.cut else self.cost(ctx, outcome)
        outcome.cost_usd = cost
        # The header says what the record says. This runs before a response that is not
        # streamed goes out; a streamed answer's headers went out before its cost was known,
        # and ctx.stamp no longer reaches them: there the header is absent.
        ctx.response_headers["x-imgproxy-cost-usd"] = usd(cost)
        # Made only where it is written (no usage_log: no record to make).
        record = self.usage_record(ctx, outcome, cost) if self.usage_log is not None else None
        if scratch is not None:
            try:
                await self.settle(ctx.gateway.state, scratch, cost, record)
            except StateUnavailable:
                self.unsettled.append((scratch, cost, record))  # the sweeper retries; recorded once settled
                return
        if record is not None:
            self.write(record)

    def worst(self, ctx, images: int) -> float:
        """The most `images` images of this request can cost: each at the highest price its
        quality and size allow, plus, for token-priced models, the prompt's tokens at worst."""
        request, price = ctx.request, self.prices[ctx.target.model.name]
        cost = images * price.image(request.quality, request.size)
        if price.per_token:
            # Each upstream call of a fanned-out n reads (and bills) the prompt again.
            calls = max(1, -(-images // ctx.target.model.capabilities.n_per_call))
            cost += calls * len(request.prompt) / TOKEN_ESTIMATE_CHARS * price.per_token["text_input"] / 1e6
            if request.form is not None:  # an edit: each call reads the input images again
                inputs = len(request.form.images) + (request.form.mask is not None)
                cost += calls * inputs * INPUT_IMAGE_TOKENS_MAX * price.per_token["image_input"] / 1e6
        return cost

    def cost(self, ctx, outcome) -> float:
        """What the request is billed: the images delivered (never more than n) at the
        request's price, or the upstream's token usage for them, never more than their worst
        case; nothing else the upstream says changes the price. Refusals, failures and answers
        the upstream broke off (outcome.upstream_error_kind, even after a 200) cost nothing."""
        # A client that left once its answer was complete (499) was still delivered to.
        failed = (outcome.status != 200 and not outcome.client_left) or outcome.upstream_error_kind is not None
        images = 0 if failed else min(outcome.images, ctx.request.n)
        # Jobs an asynchronous provider accepted and bills though they were not delivered: the
        # gateway pays for them, so the record does (see Outcome.undelivered_billed).
        undelivered = outcome.undelivered_billed
        if not images and not undelivered:
            return 0.0
        price = self.prices[ctx.target.model.name]
        if price.per_token and valid_usage(outcome.usage):
            return min(price.tokens(outcome.usage), self.worst(ctx, images))
        return (images + undelivered) * price.image(ctx.request.quality, ctx.request.size)

    def usage_record(self, ctx, outcome, cost: float) -> dict:
        # A request refused before its model and parameters were known (a body that is not
        # JSON, an unknown model, a size the model lacks) is recorded too, with what is known.
        request, target = ctx.request, ctx.target
        return {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": ctx.request_id,
            "key": ctx.identity.name,
            "model": target.model.name if target else None,  # the target that served (a fallback's when one did)
            "provider": target.provider.name if target else None,
            "requested_model": ctx.route.model.name if ctx.route else None,
            "operation": request.operation if request else None,
            "attempts": outcome.attempts,
            "n": request.n if request else None,
            "images": outcome.images,
            "size": request.size if request else None,
            "quality": request.quality if request else None,
            "cost_usd": round(cost, 6),
            "latency_seconds": round(time.monotonic() - ctx.started, 4),
            "status": outcome.status,
            "error": outcome.error_code,
            "user": ctx.user_hash,
            **({"undelivered_billed": outcome.undelivered_billed} if outcome.undelivered_billed else {}),
            **({"dropped_params": list(request.dropped)} if request and request.dropped else {}),
            **({"cut": True} if outcome.cut else {}),
            **({"price": "free"} if target and target.model.name in self.free else {}),
        }

    def pending_record(self, ctx, worst: float):
        """What is written if this request's replica dies before settling it, as a function that
        makes it: the memory backend needs it only if a sweeper claims the reservation. It keeps
        values taken now, not the context (which would then refer to itself through scratch)."""
        at, request_id, key, target, request, user = time.time(), ctx.request_id, ctx.identity.name, ctx.target, ctx.request, ctx.user_hash

        def record() -> dict:
            return {
                "time": datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds"),
                "request_id": request_id,
                "key": key,
                "model": target.model.name,
                "provider": target.provider.name,
                "n": request.n,
                "size": request.size,
                "quality": request.quality,
                "cost_usd": round(worst, 6),
                "user": user,
            }

        return record

    def write(self, record: dict) -> None:
        if self.usage_log is not None:
            self.usage_log.write(json.dumps(record) + "\n")
            self.usage_log.flush()

    async def recover_forever(self, gateway) -> None:
        interval = gateway.config.state.recovery_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.retry_settlements(gateway.state)
                for record in await gateway.state.claim_expired():
                    log.warning("request %s of key %s was never settled (its replica stopped): billed at its worst case $%s",
                                record.get("request_id"), record.get("key"), record.get("cost_usd"))
                    self.write({**record, "settled_by": "recovery", "recovered_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")})
            except StateUnavailable:
                pass  # logged and counted by the state guard; the next sweep tries again
            except Exception:
                log.exception("the sweep for unsettled reservations failed")

    async def settle(self, state, scratch: dict, cost: float, record: dict | None) -> None:
        """Replace the reservation with the real cost on every period at once (no limit applies)."""
        keys, pending = scratch["keys"], scratch["pending"]
        if pending.stored:
            found = await state.settle([Reservation(key, cost - scratch["reserved"], None, ttl) for key, ttl in keys], pending)
            if found == "settled":
                return
            if found == "recovered":
                if record is not None:
                    record["recovered_already"] = True  # billed at its worst case by a sweeper: not again
                return
        # Nothing reserved to replace (the state was unavailable under on_unavailable: open, or
        # lost it): count the real cost.
        await state.settle([Reservation(key, cost, None, ttl) for key, ttl in keys])

    async def retry_settlements(self, state, last: bool = False) -> None:
        while self.unsettled:
            scratch, cost, record = self.unsettled[0]
            try:
                await self.settle(state, scratch, cost, record)
            except StateUnavailable:
                break
            self.unsettled.pop(0)
            if record is not None:  # None: a released reservation, nothing to record
                self.write(record)
        if last:
            # Shutting down with the state still away: reservations it holds are recovered by
            # another replica; the others would be lost, so they are written unsettled.
            for scratch, cost, record in self.unsettled:
                if record is not None and not scratch["pending"].stored:
                    self.write({**record, "unsettled": True})
            self.unsettled.clear()


BUDGET_NAMES = {"daily_usd": "daily", "monthly_usd": "monthly", "usd_per_minute": "per-minute"}


@lru_cache(maxsize=1024)
def spend_periods(key_name: str, epoch_minute: int) -> tuple[tuple[str, str, float, str], ...]:
    """(budget setting, state key, ttl, reset time) for the UTC day, month and minute of
    `epoch_minute`: made once a minute per key."""
    minute = datetime.fromtimestamp(epoch_minute * 60, timezone.utc)
    day = minute.replace(hour=0, minute=0)
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    return (
        ("daily_usd", f"spend:{{{key_name}}}:day:{day:%Y-%m-%d}", 2 * 86400, (day + timedelta(days=1)).strftime(stamp)),
        ("monthly_usd", f"spend:{{{key_name}}}:month:{month:%Y-%m}", 40 * 86400, next_month.strftime(stamp)),
        ("usd_per_minute", f"spend:{{{key_name}}}:minute:{minute:%Y-%m-%dT%H:%M}", 120, (minute + timedelta(minutes=1)).strftime(stamp)),
    )


def usd(amount: float) -> str:
    return f"{amount:.6f}"
