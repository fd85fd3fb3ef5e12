"""Client authentication: `Authorization: Bearer <key>` against the keys in proxy.yaml.

Keys are kept only as SHA-256 digests and compared in constant time. With no key configured
at all, a random key is generated at start-up and printed once, so a fresh gateway is never
open to anyone who can reach it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass, field

from imgproxy.config import ConfigError
from imgproxy.errors import GatewayError
from imgproxy.hookspecs import hookimpl
from imgproxy.messages import Identity

# The one rule for every client key, however it is configured (docs/configuration.md, `auth`).
MIN_KEY_LENGTH = 8

OWN_KEY_SETTINGS = {
    "models": {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "description": "Models this key may use: names, aliases or provider/name, with * and ? globs. Absent: all.",
    },
    "log_prompts": {"type": "boolean", "description": "Prompts of this key may appear in log lines (default false)."},
}


def section_schema(key_settings: dict) -> dict:
    settings = {**OWN_KEY_SETTINGS, **key_settings}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "api_keys": {
                "type": "string",
                "description": f"Comma-separated client keys of at least {MIN_KEY_LENGTH} characters each, usually ${{IMGPROXY_API_KEYS}}; named `default` (one key) or key-1, key-2, ….",
            },
            "key_defaults": {
                "type": "object",
                "additionalProperties": False,
                "properties": settings,
                "description": "Settings every key starts from; a key's own settings replace them one by one.",
            },
            "keys": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$", "description": "Label used in logs, metrics and usage records."},
                        "key": {"type": "string", "minLength": MIN_KEY_LENGTH, "description": f"The key itself (at least {MIN_KEY_LENGTH} characters), usually ${{ENV_VAR}}."},
                        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "Hex SHA-256 of the key, instead of the key (imgproxy hash-key)."},
                        "disabled": {"type": "boolean", "description": "Refuse this key with 401 without deleting it."},
                        **settings,
                    },
                    "oneOf": [{"required": ["key"]}, {"required": ["sha256"]}],
                },
            },
        },
    }


def digest(key: str) -> bytes:
    # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way; hash the bytes sent.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class ClientKey:
    name: str
    digest: bytes
    disabled: bool = False
    settings: dict = field(default_factory=dict)


class AuthPlugin:
    def __init__(self) -> None:
        self.keys: tuple[ClientKey, ...] = ()
        self.generated: str | None = None
        self._allowed: dict[tuple[str, str], bool] = {}

    @hookimpl
    def imgproxy_key_schema(self):
        return OWN_KEY_SETTINGS

    @hookimpl
    def imgproxy_config_schema(self, key_settings):
        return {"auth": section_schema(key_settings)}

    @hookimpl
    def imgproxy_configure(self, gateway):
        section = gateway.config.sections.get("auth", {})
        defaults = section.get("key_defaults", {})
        keys, names = [], set()
        env_keys = [k.strip() for k in section.get("api_keys", "").split(",") if k.strip()]
        for i, key in enumerate(env_keys, 1):
            if len(key) < MIN_KEY_LENGTH:
                # Name where the key came from, never the key: this message reaches logs.
                origin = " and ".join(f"${name}" for name in gateway.config.refs.get("auth.api_keys", ())) or "auth.api_keys"
                raise ConfigError(
                    gateway.config.source, ["auth", "api_keys"],
                    f"key {i} of {len(env_keys)} in {origin} is shorter than {MIN_KEY_LENGTH} characters (every client key needs at least {MIN_KEY_LENGTH})",
                )
            keys.append(ClientKey("default" if len(env_keys) == 1 else f"key-{i}", digest(key), settings=defaults))
        for entry in section.get("keys", []):
            own = {k: v for k, v in entry.items() if k not in ("name", "key", "sha256", "disabled")}
            key_digest = digest(entry["key"]) if "key" in entry else bytes.fromhex(entry["sha256"])
            keys.append(ClientKey(entry["name"], key_digest, entry.get("disabled", False), {**defaults, **own}))
        for key in keys:
            if key.name in names:
                raise ConfigError(gateway.config.source, f"auth.keys: {key.name}", "key names must be unique")
            names.add(key.name)
        if not keys:
            self.generated = "sk-imgproxy-" + secrets.token_urlsafe(24)
            keys.append(ClientKey("generated", digest(self.generated), settings=defaults))
        self.keys = tuple(keys)

    @hookimpl
    def imgproxy_startup(self, gateway):
        if self.generated:
            # Printed once, like a notebook server's token; never written to the log.
            print(
                "imgproxy: no client keys are configured (auth.api_keys / IMGPROXY_API_KEYS), so this run "
                f"accepts one generated key:\n\n    {self.generated}\n",
                file=sys.stderr,
                flush=True,
            )

    @hookimpl
    def imgproxy_authenticate(self, ctx):
        header = ctx.http.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise GatewayError(
                401, "The Authorization header must be 'Bearer <your imgproxy key>'.", code="invalid_api_key"
            )
        presented = digest(token)
        match = None
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(key.digest, presented):
                match = key
        if match is None:
            return None
        if match.disabled:
            raise GatewayError(401, f"The API key '{match.name}' has been disabled.", code="api_key_disabled")
        return Identity(match.name, match.settings)

    @hookimpl
    def imgproxy_authorize_model(self, identity, model):
        patterns = identity.settings.get("models")
        if patterns is None:
            return
        allowed = self._allowed.get((identity.name, model.name))
        if allowed is None:
            # Decided once per (key, model): the answer depends on nothing else.
            names = (model.name, *model.aliases, f"{model.provider}/{model.name}", f"{model.provider}/{model.upstream_model}")
            allowed = any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names)
            self._allowed[(identity.name, model.name)] = allowed
        if not allowed:
            raise GatewayError(
                403,
                f"The API key '{identity.name}' may not use the model '{model.name}'.",
                type="permission_error",
                code="model_not_allowed",
                param="model",
            )
