"""Per-key rate limits: requests and images per minute, optionally per (key, user).

GCRA over the gateway's state backend: both limits are charged together or not at all.
Every response carries OpenAI's `x-ratelimit-*` headers for the limits the key has.
"""

from __future__ import annotations

import math

from imgproxy.errors import GatewayError
from imgproxy.hookspecs import hookimpl
from imgproxy.state import RateLimit

PERIOD = 60.0

KEY_SETTINGS = {
    "rate_limit": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "requests_per_minute": {"type": "integer", "minimum": 1},
            "images_per_minute": {"type": "integer", "minimum": 1, "description": "A request for n images takes n."},
            "per_user": {"type": "boolean", "description": "Limit each end user (`user`) of the key separately (default false)."},
        },
    }
}


class RateLimitPlugin:
    @hookimpl
    def imgproxy_key_schema(self):
        return KEY_SETTINGS

    @hookimpl
    async def imgproxy_check_limits(self, ctx):
        settings = ctx.identity.settings.get("rate_limit") or {}
        scope = ctx.identity.name
        if settings.get("per_user") and ctx.request.user is not None:
            scope += ":" + ctx.user_hash
        limits, kinds = [], []
        for kind, setting, cost in (("requests", "requests_per_minute", 1), ("images", "images_per_minute", ctx.request.n)):
            if setting in settings:
                limits.append(RateLimit(f"ratelimit:{{{scope}}}:{kind}", settings[setting], PERIOD, cost))
                kinds.append(kind)
        if not limits:
            return
        decisions = await ctx.gateway.state.rate_limit(limits)
        for kind, decision in zip(kinds, decisions):
            ctx.response_headers[f"x-ratelimit-limit-{kind}"] = str(decision.limit)
            ctx.response_headers[f"x-ratelimit-remaining-{kind}"] = str(decision.remaining)
            ctx.response_headers[f"x-ratelimit-reset-{kind}"] = duration(decision.reset_after)
        for kind, limit, decision in zip(kinds, limits, decisions):
            if decision.allowed:
                continue
            if math.isinf(decision.retry_after):
                raise GatewayError(
                    429,
                    f"This request asks for {limit.cost} images, more than the {limit.limit} images per minute "
                    f"the API key '{ctx.identity.name}' may use; ask for fewer.",
                    type="requests",
                    code="rate_limit_exceeded",
                    should_retry=False,  # larger than the allowance: waiting cannot help
                )
            wait = max(1, math.ceil(decision.retry_after))
            raise GatewayError(
                429,
                f"Rate limit reached for the API key '{ctx.identity.name}': {limit.limit} {kind} per minute. "
                f"Try again in {duration(decision.retry_after)}.",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `7s`, `1m30s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    seconds = math.ceil(seconds)
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"
