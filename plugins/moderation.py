"""Moderation: which levels a key may ask for, the gateway's own content policy, an optional
upstream moderation model, and cool-downs for end users who keep violating the policy.

Order within a request: level allowed for the key → user not cooling down (both in
imgproxy_authorize_request) → the key's rate limits and budget (other plugins) → content-policy
rules → moderation model (imgproxy_check_content). Every refusal happens before any upstream
image call.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from imgproxy.config import ConfigError
from imgproxy.errors import GatewayError
from imgproxy.hookspecs import hookimpl
from imgproxy.upstream import UpstreamCall

log = logging.getLogger("imgproxy.moderation")

LEVELS = ("auto", "low")
ACTIONS = ("block", "flag", "allow")
POLICY_CODES = {"content_policy_violation", "moderation_blocked"}
DEFAULT_UPSTREAM_BLOCK = {"auto": ["*"], "low": ["sexual/minors", "self-harm/instructions", "illicit/violent"]}

_level_actions = {"type": "object", "additionalProperties": False, "properties": {level: {"enum": list(ACTIONS)} for level in LEVELS}}

SECTION_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "categories": {
            "type": "object",
            "description": "Named content-policy categories checked against every prompt.",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "words": {"type": "array", "items": {"type": "string", "minLength": 1}, "description": "Whole words or phrases, any case."},
                    "patterns": {"type": "array", "items": {"type": "string", "minLength": 1}, "description": "Regular expressions, any case."},
                    "action": {**_level_actions, "description": "What a match does at each moderation level: block (default), flag (log only) or allow."},
                },
            },
        },
        "upstream": {
            "type": "object",
            "additionalProperties": False,
            "required": ["provider"],
            "description": "Consult a moderation model speaking OpenAI's /moderations wire format.",
            "properties": {
                "provider": {"type": "string", "description": "A provider of type openai whose base_url and key are used."},
                "model": {"type": "string", "description": "Default omni-moderation-latest."},
                "timeout": {"type": "number", "exclusiveMinimum": 0, "description": "Seconds (default 2)."},
                "on_failure": {"enum": ["allow", "block"], "description": "When the model cannot be asked: allow (fail open) or block (fail closed, default)."},
                "block": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {level: {"type": "array", "items": {"type": "string"}} for level in LEVELS},
                    "description": "Flagged categories that block at each level; * is any.",
                },
            },
        },
        "abuse": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_violations": {"type": "integer", "minimum": 1, "description": "Violations by one (key, user) within `window` before a cool-down (default 5)."},
                "window": {"type": "number", "exclusiveMinimum": 0, "description": "Seconds (default 3600)."},
                "cooldown": {"type": "number", "exclusiveMinimum": 0, "description": "Seconds the user is refused with 403 (default 900)."},
            },
        },
    },
}

KEY_SETTINGS = {
    "moderation_levels": {
        "type": "array",
        "items": {"enum": list(LEVELS)},
        "minItems": 1,
        "uniqueItems": True,
        "description": "Moderation levels this key may ask for (default: auto only).",
    }
}


@dataclass(frozen=True)
class Category:
    name: str
    pattern: re.Pattern
    actions: dict[str, str]


class ModerationPlugin:
    def __init__(self) -> None:
        self.categories: tuple[Category, ...] = ()
        self.upstream: dict | None = None
        self.abuse = {"max_violations": 5, "window": 3600.0, "cooldown": 900.0}

    @hookimpl
    def imgproxy_key_schema(self):
        return KEY_SETTINGS

    @hookimpl
    def imgproxy_config_schema(self):
        return {"moderation": SECTION_SCHEMA}

    @hookimpl
    def imgproxy_configure(self, gateway):
        section = gateway.config.sections.get("moderation", {})
        source = gateway.config.source
        categories = []
        for name, spec in section.get("categories", {}).items():
            parts = [r"\b" + re.escape(word) + r"\b" for word in spec.get("words", [])]
            for i, pattern in enumerate(spec.get("patterns", [])):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(source, ["moderation", "categories", name, "patterns", i], f"not a regular expression: {exc}") from None
                parts.append(f"(?:{pattern})")
            if not parts:
                raise ConfigError(source, ["moderation", "categories", name], "needs words or patterns")
            actions = {level: "block" for level in LEVELS} | spec.get("action", {})
            categories.append(Category(name, re.compile("|".join(parts), re.IGNORECASE), actions))
        self.categories = tuple(categories)
        upstream = section.get("upstream")
        if upstream is not None:
            provider = gateway.config.providers.get(upstream["provider"])
            if provider is None or provider.type != "openai":
                raise ConfigError(source, ["moderation", "upstream", "provider"], f"{upstream['provider']!r} is not a provider of type openai")
            self.upstream = {
                "provider": provider,
                "model": upstream.get("model", "omni-moderation-latest"),
                "timeout": upstream.get("timeout", 2.0),
                "on_failure": upstream.get("on_failure", "block"),
                "block": DEFAULT_UPSTREAM_BLOCK | upstream.get("block", {}),
            }
        self.abuse |= section.get("abuse", {})

    @hookimpl
    async def imgproxy_authorize_request(self, ctx):
        level = ctx.request.moderation
        allowed = ctx.identity.settings.get("moderation_levels", ["auto"])
        if level not in allowed:
            raise GatewayError(
                403,
                f"The API key '{ctx.identity.name}' may not use moderation level '{level}' (allowed: {', '.join(allowed)}).",
                type="permission_error",
                code="moderation_level_not_allowed",
                param="moderation",
            )
        await self._refuse_cooling_down_user(ctx)

    @hookimpl
    async def imgproxy_check_content(self, ctx):
        # After the rate limits and budget (imgproxy_check_limits): the moderation model is a
        # paid call, never made for a caller who is over its limits.
        level = ctx.request.moderation
        for category in self.categories:
            if category.pattern.search(ctx.request.prompt):
                action = category.actions[level]
                if action == "block":
                    await self._refuse(ctx, f"the category '{category.name}'")
                if action == "flag":
                    self._log_flag(ctx, category.name)
        if self.upstream is not None and ctx.request.prompt:  # a variation has no text to check
            await self._ask_moderation_model(ctx, level)

    @hookimpl
    async def imgproxy_record_usage(self, ctx, outcome):
        if ctx.scratch.get("moderation_counted") or ctx.request is None:
            return
        if outcome.error_code in POLICY_CODES or outcome.filtered:
            await self._count_violation(ctx)

    async def _refuse_cooling_down_user(self, ctx) -> None:
        if ctx.request.user is None:
            return
        until = await ctx.gateway.state.get(self._key(ctx, "cooldown"))
        remaining = until - time.time()
        if remaining > 0:
            raise GatewayError(
                403,
                "This end user is refused for a while after repeated content-policy violations.",
                type="permission_error",
                code="user_cooling_down",
                param="user",
                headers={"Retry-After": str(int(remaining) + 1)},
            )

    async def _refuse(self, ctx, what: str) -> None:
        await self._count_violation(ctx)
        ctx.scratch["moderation_counted"] = True
        self._log_flag(ctx, what, refused=True)
        raise GatewayError(
            400,
            f"Your request was rejected by this gateway's content policy ({what}).",
            code="content_policy_violation",
            param="prompt",
        )

    async def _ask_moderation_model(self, ctx, level: str) -> None:
        spec = self.upstream
        provider = spec["provider"]
        called = ctx.outcome.upstream_called
        try:
            async with ctx.gateway.upstream.request(
                UpstreamCall.for_request(ctx, spec["timeout"]),
                provider,
                "POST",
                f"{provider.base_url}/moderations",
                timeout=spec["timeout"],
                json={"model": spec["model"], "input": ctx.request.prompt},
                headers={"Authorization": f"Bearer {provider.api_key}"},
            ) as resp:
                if resp.status != 200:
                    raise GatewayError(502, f"HTTP {resp.status}", code="upstream_error")
                body = await ctx.gateway.upstream.read_json(resp, provider)
            result = body["results"][0]
            flagged = [name for name, value in result["categories"].items() if value is True]
        except (GatewayError, KeyError, IndexError, TypeError, AttributeError) as exc:
            # Our own words or the exception's class: never its repr, which may quote the answer.
            log.warning("moderation model unavailable (%s); failing %s (request %s)", getattr(exc, "message", type(exc).__name__),
                        "open" if spec["on_failure"] == "allow" else "closed", ctx.request_id)
            if spec["on_failure"] == "allow":
                return
            raise GatewayError(
                503, "The content moderation service is unavailable; try again later.", type="server_error", code="moderation_unavailable"
            ) from None
        finally:
            # `upstream_called` is the generation call (what a cut bills and an Idempotency-Key
            # keeps): a refusal here is decided before it, like any other policy refusal.
            ctx.outcome.upstream_called = called
        blocking = spec["block"].get(level, [])
        hits = [name for name in flagged if "*" in blocking or name in blocking]
        if hits:
            await self._refuse(ctx, "flagged by the moderation model: " + ", ".join(sorted(hits)))
        elif flagged:
            self._log_flag(ctx, "moderation model: " + ", ".join(sorted(flagged)))

    async def _count_violation(self, ctx) -> None:
        if ctx.request.user is None:
            return  # without an end-user id there is no one to cool down but the whole key
        state = ctx.gateway.state
        count = await state.add(self._key(ctx, "violations"), 1, ttl=self.abuse["window"])
        if count >= self.abuse["max_violations"]:
            cooldown = self.abuse["cooldown"]
            await state.set(self._key(ctx, "cooldown"), time.time() + cooldown, ttl=cooldown)
            log.warning("user %s of key %s cooling down for %gs after %d violations", ctx.user_hash, ctx.identity.name, cooldown, count)

    def _key(self, ctx, kind: str) -> str:
        return f"moderation:{kind}:{ctx.identity.name}:{ctx.user_hash}"

    def _log_flag(self, ctx, what: str, refused: bool = False) -> None:
        prompt = f" prompt={ctx.request.prompt!r}" if ctx.identity.settings.get("log_prompts") else ""
        log.warning(
            "%s by %s: key=%s user=%s request=%s%s",
            "refused" if refused else "flagged", what, ctx.identity.name, ctx.user_hash, ctx.request_id, prompt,
        )
