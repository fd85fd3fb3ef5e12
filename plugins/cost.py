"""Cost metering and budgets.

Before the upstream call, the worst case a request can cost is reserved against the key's
daily, monthly and per-minute spend (refused with 429 `insufficient_quota` if a budget would
be crossed); afterwards the reservation is settled to what was really delivered: images delivered (at
most n) times their price, or the upstream's token `usage`, bounded by the worst case. Every
finished request is written as a usage record (JSON lines) for billing export, and the
`x-imgproxy-cost-usd` header of a response that is not streamed carries the same cost.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from imgproxy.errors import GatewayError
from imgproxy.hookspecs import hookimpl
from imgproxy.inline_images import valid_usage
from imgproxy.state import Reservation

log = logging.getLogger("imgproxy.cost")

# Published prices in USD (credits for Stability), per image by quality then size; "*" matches
# anything. Token prices are USD per million tokens.
BUILTIN_PRICES: dict[str, dict] = {
    "dall-e-2": {"per_image": {"*": {"256x256": 0.016, "512x512": 0.018, "1024x1024": 0.020}}},
    "dall-e-3": {
        "per_image": {
            "standard": {"1024x1024": 0.040, "1792x1024": 0.080, "1024x1792": 0.080},
            "hd": {"1024x1024": 0.080, "1792x1024": 0.120, "1024x1792": 0.120},
        }
    },
    "gpt-image-1": {
        "per_image": {
            "low": {"1024x1024": 0.011, "1024x1536": 0.016, "1536x1024": 0.016},
            "medium": {"1024x1024": 0.042, "1024x1536": 0.063, "1536x1024": 0.063},
            "high": {"1024x1024": 0.167, "1024x1536": 0.25, "1536x1024": 0.25},
        },
        "per_million_tokens": {"text_input": 5.0, "image_input": 10.0, "output": 40.0},
    },
    # 30 diffusion steps (quality standard) and 50 (hd); one credit is `credit_usd`.
    "stable-diffusion-xl-1024-v1-0": {"per_image_credits": {"standard": {"*": 0.2}, "hd": {"*": 0.33}}},
    "placeholder": {"per_image": {"*": {"*": 0.0}}},
}

_table = {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}}}
PRICE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "per_image": {**_table, "description": "USD per image: {quality: {size: price}}, * for any."},
        "per_image_credits": {**_table, "description": "As per_image, in provider credits (see credit_usd)."},
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
        "prices": {"type": "object", "additionalProperties": PRICE_SCHEMA, "description": "By public model name or upstream model; replaces the built-in price."},
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

TOKEN_ESTIMATE_CHARS = 2  # worst case for the prompt's tokens: one token per two characters


@dataclass(frozen=True)
class Price:
    per_image: dict  # {quality: {size: usd}}
    per_token: dict | None  # USD per million tokens
    _known: dict = field(default_factory=dict, compare=False)

    def image(self, quality: str | None, size: str | None) -> float:
        """The price of one image; for `auto` (or an unlisted) quality or size, the highest it could be."""
        key = (quality, size)
        price = self._known.get(key)
        if price is None:
            price = self._known[key] = self._image(quality, size)
        return price

    def _image(self, quality: str | None, size: str | None) -> float:
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


def _exact(table: dict, name: str | None):
    return table.get(name) if name in table else table.get("*")


class CostPlugin:
    def __init__(self) -> None:
        self.prices: dict[str, Price] = {}
        self.usage_log = None
        self._usage_target = ""

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
        for model in gateway.config.models.values():
            spec = next(
                (table.get(name) for table in (overrides, BUILTIN_PRICES) for name in (model.name, model.upstream_model, model.catalog) if name in table),
                None,
            )
            if spec is None:
                log.warning("no price for model %s: it is metered at $0 (add it under cost.prices)", model.name)
                spec = {"per_image": {"*": {"*": 0.0}}}
            per_image = spec.get("per_image") or {
                q: {s: credits * credit for s, credits in sizes.items()} for q, sizes in spec.get("per_image_credits", {}).items()
            }
            self.prices[model.name] = Price(per_image, spec.get("per_million_tokens"))
        self._usage_target = section.get("usage_log", "")

    @hookimpl
    def imgproxy_startup(self, gateway):
        if self._usage_target == "stdout":
            self.usage_log = sys.stdout
        elif self._usage_target:
            self.usage_log = open(self._usage_target, "a", encoding="utf-8")  # noqa: SIM115 (closed at shutdown)

    @hookimpl
    def imgproxy_shutdown(self, gateway):
        if self.usage_log not in (None, sys.stdout):
            self.usage_log.close()
        self.usage_log = None

    @hookimpl
    async def imgproxy_check_request(self, ctx):
        request, price = ctx.request, self.prices[ctx.route.model.name]
        worst = self.worst(ctx, request.n)
        if price.per_token and not request.stream:
            ctx.needs_body = True  # token usage is in the body: read it before answering
        budget = ctx.identity.settings.get("budget", {})
        periods = spend_periods(ctx.identity.name, int(time.time() // 60))
        reservations = [Reservation(key, worst, budget.get(setting), ttl) for setting, key, ttl, _ in periods]
        failed = await ctx.gateway.state.reserve(reservations)
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
        ctx.scratch["cost"] = {"reserved": worst, "keys": [(key, ttl) for _, key, ttl, _ in periods]}

    @hookimpl
    async def imgproxy_record_usage(self, ctx, outcome):
        scratch = ctx.scratch.get("cost")
        cost = 0.0
        if scratch is not None:
            cost = self.cost(ctx, outcome)
            # Settle the reservation to the real cost on every period at once (no limit applies).
            settle = cost - scratch["reserved"]
            await ctx.gateway.state.reserve([Reservation(key, settle, None, ttl) for key, ttl in scratch["keys"]])
        outcome.cost_usd = cost
        # The header says what the record says. This runs before a response that is not
        # streamed goes out; a streamed answer's headers went out before its cost was known,
        # and ctx.stamp no longer reaches them: there the header is absent.
        ctx.response_headers["x-imgproxy-cost-usd"] = usd(cost)
        if self.usage_log is not None and ctx.request is not None:
            self.write_record(ctx, outcome, cost)

    def worst(self, ctx, images: int) -> float:
        """The most `images` images of this request can cost: each at the highest price its
        quality and size allow, plus, for token-priced models, the prompt's tokens at worst."""
        request, price = ctx.request, self.prices[ctx.route.model.name]
        cost = images * price.image(request.quality, request.size)
        if price.per_token:
            cost += len(request.prompt) / TOKEN_ESTIMATE_CHARS * price.per_token["text_input"] / 1e6
        return cost

    def cost(self, ctx, outcome) -> float:
        """What the request is billed: the images delivered (never more than n) at the
        request's price, or the upstream's token usage for them, never more than their worst
        case; nothing else the upstream says changes the price. Refusals, failures and answers
        the upstream broke off (outcome.upstream_error_kind, even after a 200) cost nothing."""
        failed = outcome.status != 200 or outcome.upstream_error_kind is not None
        images = 0 if failed else min(outcome.images, ctx.request.n)
        if not images:
            return 0.0
        price = self.prices[ctx.route.model.name]
        if price.per_token and valid_usage(outcome.usage):
            return min(price.tokens(outcome.usage), self.worst(ctx, images))
        return images * price.image(ctx.request.quality, ctx.request.size)

    def write_record(self, ctx, outcome, cost: float) -> None:
        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": ctx.request_id,
            "key": ctx.identity.name,
            "model": ctx.route.model.name,
            "provider": ctx.route.provider.name,
            "n": ctx.request.n,
            "images": outcome.images,
            "size": ctx.request.size,
            "quality": ctx.request.quality,
            "cost_usd": round(cost, 6),
            "latency_seconds": round(time.monotonic() - ctx.started, 4),
            "status": outcome.status,
            "error": outcome.error_code,
            "user": ctx.user_hash,
        }
        self.usage_log.write(json.dumps(record) + "\n")
        self.usage_log.flush()


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
        ("daily_usd", f"spend:{key_name}:day:{day:%Y-%m-%d}", 2 * 86400, (day + timedelta(days=1)).strftime(stamp)),
        ("monthly_usd", f"spend:{key_name}:month:{month:%Y-%m}", 40 * 86400, next_month.strftime(stamp)),
        ("usd_per_minute", f"spend:{key_name}:minute:{minute:%Y-%m-%dT%H:%M}", 120, (minute + timedelta(minutes=1)).strftime(stamp)),
    )


def usd(amount: float) -> str:
    return f"{amount:.6f}"
