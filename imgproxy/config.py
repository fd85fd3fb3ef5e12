"""Reading proxy.yaml: ${VAR} substitution, schema validation, and typed settings."""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from . import schemafiles
from .catalog import Capabilities, builtin_adapters, builtin_catalog, capabilities_for, merged
from .egress import BadEntry, EgressPolicy, policy_for
from .resilience import BreakerConfig, RetryPolicy
from .stores.filesystem import default_directory

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

DEFAULT_TIMEOUTS = {"connect": 10.0, "total": 180.0}


class ConfigError(Exception):
    """A config file that cannot be used; names the file, the key path and what is wrong."""

    def __init__(self, source: str, path: list | str, problem: str) -> None:
        self.source, self.path, self.problem = source, schemafiles.dotted(path) if isinstance(path, list) else path, problem
        super().__init__(f"{source}: {self.path}: {problem}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1024 * 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    max_uploads: int = 32  # edit/variation forms held at once (imgproxy.limits.UploadSlots)
    body_timeout: float = 60.0  # seconds for a request body to arrive once its headers have
    drain_timeout: float = 25.0
    reload_interval: float = 10.0
    backlog: int = 128
    # Resource limits (docs/security.md); read when the server starts.
    max_connections: int = 1024
    header_timeout: float = 10.0
    write_timeout: float = 30.0  # seconds a client may stop reading its answer before it is dropped
    max_header_bytes: int = 64 * 1024
    keepalive_timeout: float = 75.0
    max_upstream_buffer_bytes: int = 96 * 1024 * 1024
    # Browser origins allowed to call the API (imgproxy.cors); read per request, so a reload applies.
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))


@dataclass(frozen=True)
class MetricsConfig:
    port: int | None = None  # None: /metrics on the API port
    host: str = "0.0.0.0"


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    type: str
    base_url: str
    api_key: str
    # Environment variables the api_key was read from: named in the error when it is empty.
    api_key_vars: tuple[str, ...]
    connect_timeout: float
    total_timeout: float
    image_hosts: tuple[str, ...]
    options: dict = field(default_factory=dict)
    # Where this provider's requests may go (base_url, image_hosts, allow_private_addresses).
    egress: EgressPolicy | None = None
    retries: RetryPolicy = RetryPolicy()
    circuit_breaker: BreakerConfig | None = None  # None: no circuit breaker

    def __post_init__(self) -> None:
        if self.egress is None:  # built in code, not read from a config: the default policy
            object.__setattr__(self, "egress", policy_for(self.base_url, self.image_hosts, None))


@dataclass(frozen=True)
class ModelConfig:
    name: str
    provider: str
    upstream_model: str
    aliases: tuple[str, ...]
    capabilities: Capabilities
    timeout: float | None = None
    catalog: str = ""  # the built-in catalog entry it started from
    fallbacks: tuple[str, ...] = ()  # public model names tried in order when this one cannot serve
    fallback_strictness: str = "translate"  # translate | skip
    deadline: float | None = None  # seconds for all attempts together; None: the first target's timeout
    free: bool = False  # metered at $0 on purpose (the cost plugin refuses a model with no price otherwise)
    shutdown: datetime.date | None = None  # UTC date from which it is refused as retired (imgproxy.routing)
    replacement: str | None = None  # the public name of the model to use instead, if this file serves it

    def retired(self, today: datetime.date) -> bool:
        return self.shutdown is not None and today >= self.shutdown
    unsupported_parameters: str = "refuse"  # refuse | drop (imgproxy.validation.check_capabilities)


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str = "images/"
    endpoint_url: str = ""  # empty: AWS
    region: str = "us-east-1"
    urls: str = "gateway"  # gateway | presigned


@dataclass(frozen=True)
class ImagesConfig:
    directory: str = ""  # empty: a folder private to this user (stores.filesystem.default_directory)
    url_ttl: int = 3600
    signing_key: bytes = b""
    public_base_url: str = ""
    upstream_urls: str = "rehost"
    sweep_interval: int = 60
    max_image_bytes: int = 64 * 1024 * 1024
    store: str = "filesystem"
    s3: S3Config | None = None
    max_bytes: int = 0  # 0: no cap
    store_timeout: float = 10.0
    on_store_failure: str = "inline"  # inline | error
    # The folder is the built-in default, which must be ours alone.
    private_directory: bool = False


@dataclass(frozen=True)
class StateConfig:
    backend: str = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "imgproxy:"
    on_unavailable: str = "closed"
    timeout: float = 0.5
    recovery_interval: float = 10.0
    recovery_margin: float = 60.0
    per_process: bool = False  # memory backend under several workers: limits per worker, on purpose


@dataclass(frozen=True)
class IdempotencyConfig:
    ttl: float = 86400.0
    wait: float = 10.0
    max_answer_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    source: str
    server: ServerConfig
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    images: ImagesConfig
    metrics: MetricsConfig
    logging: LoggingConfig
    default_model: str | None
    user_hash_key: bytes
    state: StateConfig
    idempotency: IdempotencyConfig
    # Every top-level section as written (after substitution), for plugins to read their own.
    sections: dict
    # Per dotted key path, the ${VAR}s its value came from (names only, never the values).
    refs: dict = field(default_factory=dict)

    def model_named(self, public: str) -> ModelConfig:
        """The model a public name or alias belongs to."""
        return next(m for m in self.models.values() if public == m.name or public in m.aliases)


def substitute_env(node, env, source: str, path: list, refs: dict):
    """Replace ${VAR} and ${VAR:-default} in every string of the tree; `$$` is a literal `$`.

    Values stay strings. `refs` collects, per dotted key path, the variables it referenced.
    """
    if isinstance(node, dict):
        return {k: substitute_env(v, env, source, path + [k], refs) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_env(v, env, source, path + [i], refs) for i, v in enumerate(node)]
    if isinstance(node, datetime.date):  # YAML reads an unquoted 2026-05-12 as a date: keep the text
        return node.isoformat()
    if not isinstance(node, str):
        return node

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name is None:
            return "$"
        refs.setdefault(schemafiles.dotted(path), []).append(name)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(source, path, f"environment variable {name} is not set (write ${{{name}:-}} to allow that)")
            return default
        return value

    return _ENV_REF.sub(replace, node)


def _shown(value, path: list, refs: dict) -> str:
    """A value quoted in an error, unless it came from the environment."""
    return "the value" if variables_under(refs, schemafiles.dotted(path)) else repr(value)


def read_config_file(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "(file)", f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def parse_config(
    text: str, *, source: str = "<config>", env=None, extra_sections: dict | None = None, provider_types=None
) -> Config:
    """Parse, substitute and validate a config text. `extra_sections` maps top-level keys that
    plugins add to their JSON Schemas; `provider_types` is the set of known adapter types."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise ConfigError(source, where, f"not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(source, "(top level)", "must be a mapping with at least `providers` and `models`")
    refs: dict[str, list[str]] = {}
    raw = substitute_env(raw, os.environ if env is None else env, source, [], refs)

    schema = dict(schemafiles.load("proxy.schema.json"))
    schema["properties"] = {**schema["properties"], **(extra_sections or {})}
    env = os.environ if env is None else env
    try:
        problem = schemafiles.first_error(schemafiles.validator(schema), raw)
        if problem:
            raise ConfigError(source, *problem)
        return _build(raw, source, refs, provider_types, env)
    except ConfigError as exc:
        raise without_values(exc, refs, env) from None


def variables_under(refs: dict, path: str) -> list[str]:
    """The ${VAR}s the value at `path` (or anything inside it) came from."""
    if path.startswith("("):
        return []
    names = [name for where, used in refs.items() if where == path or where.startswith(path + ".") for name in used]
    return list(dict.fromkeys(names))


def without_values(error: ConfigError, refs: dict, env) -> ConfigError:
    """The error with no value that came from the environment in it, saying where it came
    from instead: `(value from $TEAM_KEY)`. Errors are printed and logged (a failed reload
    goes to the ERROR log); a variable's value may be a key."""
    problem = error.problem
    for name in dict.fromkeys(name for used in refs.values() for name in used):
        value = env.get(name) or ""
        if len(value) >= 4:  # shorter values are no secret, and would garble the words
            problem = problem.replace(value, f"${name}")
    names = variables_under(refs, error.path)
    if names and "value from $" not in problem:
        problem += " (value from " + ", ".join(f"${name}" for name in names) + ")"
    return ConfigError(error.source, error.path, problem)


def _build(raw: dict, source: str, refs: dict, provider_types, env) -> Config:
    providers = {}
    for name, spec in raw["providers"].items():
        if provider_types is not None and spec["type"] not in provider_types:
            known = ", ".join(sorted(provider_types))
            where = ["providers", name, "type"]
            raise ConfigError(source, where, f"unknown provider type {_shown(spec['type'], where, refs)} (known: {known})")
        base_url = spec.get("base_url", "")
        scheme = urlsplit(base_url).scheme if base_url else "http"
        if scheme not in ("http", "https"):
            # Only the scheme: a URL may carry a password.
            raise ConfigError(source, ["providers", name, "base_url"], f"must be an http(s) URL, not {scheme or 'one without a scheme'}")
        timeouts = {**DEFAULT_TIMEOUTS, **spec.get("timeouts", {})}
        try:
            egress = policy_for(base_url.rstrip("/"), spec.get("image_hosts", ()), spec.get("allow_private_addresses"))
        except BadEntry as exc:
            raise ConfigError(source, ["providers", name, *exc.key], str(exc)) from None
        providers[name] = ProviderConfig(
            name=name,
            type=spec["type"],
            base_url=base_url.rstrip("/"),
            api_key=spec.get("api_key", ""),
            api_key_vars=tuple(refs.get(f"providers.{name}.api_key", ())),
            connect_timeout=float(timeouts["connect"]),
            total_timeout=float(timeouts["total"]),
            image_hosts=tuple(spec.get("image_hosts", ())),
            options=spec.get("options", {}),
            egress=egress,
            retries=RetryPolicy(**spec.get("retries", {})),
            circuit_breaker=BreakerConfig(**spec["circuit_breaker"]) if "circuit_breaker" in spec else None,
        )

    models, public_names = {}, {}
    models_known = builtin_catalog() if provider_types is None else merged(provider_types.values())
    adapters = builtin_adapters() if provider_types is None else provider_types
    replacements = {}
    for name, spec in raw["models"].items():
        if spec["provider"] not in providers:
            where = ["models", name, "provider"]
            raise ConfigError(source, where, f"no provider named {_shown(spec['provider'], where, refs)} (have: {', '.join(providers)})")
        upstream = spec.get("upstream_model", name)
        catalog = spec.get("catalog", upstream)
        try:
            caps = capabilities_for(catalog, spec.get("capabilities"), models_known)
        except (KeyError, TypeError) as exc:
            raise ConfigError(source, ["models", name, "capabilities"], f"incomplete for a model outside the catalog: {exc}") from None
        _check_capabilities(caps, source, ["models", name, "capabilities"])
        model = ModelConfig(
            name, spec["provider"], upstream, tuple(spec.get("aliases", ())), caps, spec.get("timeout"), catalog,
            tuple(spec.get("fallbacks", ())), spec.get("fallback_strictness", "translate"), spec.get("deadline"),
            spec.get("free", False), unsupported_parameters=spec.get("unsupported_parameters", "refuse"),
        )
        # A shutdown is the provider's: only the catalog of the model's own provider type says
        # one (an Azure deployment of dall-e-3 does not retire with OpenAI's), and the file
        # overrides it.
        own = getattr(adapters.get(providers[spec["provider"]].type), "models", None) or {}
        lifecycle = {**(own[catalog].lifecycle if catalog in own else {}), **{k: spec[k] for k in ("shutdown", "replacement") if k in spec}}
        model = replace(model, shutdown=_date(lifecycle.get("shutdown"), source, ["models", name, "shutdown"]))
        replacements[name] = lifecycle.get("replacement")
        for public in (name, *model.aliases):
            if public in public_names:
                raise ConfigError(source, ["models", name], f"name {_shown(public, ['models', name], refs)} is already used by model {public_names[public]!r}")
            public_names[public] = name
        models[name] = model

    for name, model in models.items():
        for index, fallback in enumerate(model.fallbacks):
            where = ["models", name, "fallbacks", index]
            # Only the image models of this file: a fallback is called the same way.
            if fallback not in public_names:
                raise ConfigError(source, where, f"no image model or alias named {_shown(fallback, where, refs)} under models")
            if public_names[fallback] == name:
                raise ConfigError(source, where, "a model cannot be its own fallback")

    for name, wanted in replacements.items():
        served_as = _served_as(wanted, models, public_names) if wanted is not None else None
        if served_as not in (None, name):  # never "use 'dall-e-3' instead" for dall-e-3
            models[name] = replace(models[name], replacement=served_as)

    default_model = raw.get("default_model")
    if default_model is not None and default_model not in public_names:
        raise ConfigError(source, ["default_model"], f"no model or alias named {_shown(default_model, ['default_model'], refs)}")

    server = ServerConfig(**raw.get("server", {}))
    images = _images(dict(raw.get("images", {})), source, refs, env)
    return Config(
        source=source,
        server=server,
        providers=providers,
        models=models,
        images=images,
        metrics=MetricsConfig(**raw.get("metrics", {})),
        logging=LoggingConfig(**raw.get("logging", {})),
        default_model=default_model,
        user_hash_key=raw.get("privacy", {}).get("user_hash_key", "").encode(),
        state=StateConfig(**raw.get("state", {})),
        idempotency=IdempotencyConfig(**raw.get("idempotency", {})),
        sections=raw,
        refs=refs,
    )


def _date(value, source: str, path: list) -> datetime.date | None:
    if value is None:
        return None
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", str(value)):
        try:
            return datetime.date.fromisoformat(str(value))
        except ValueError:  # 2026-02-30
            pass
    raise ConfigError(source, path, "must be a date written YYYY-MM-DD, such as \"2026-05-12\"")


def _served_as(wanted: str, models: dict, public_names: dict) -> str | None:
    """The public name under which this file serves the model `wanted` (a public name, alias,
    upstream model or catalog entry), or None."""
    if wanted in public_names:
        return public_names[wanted]
    return next((m.name for m in models.values() if wanted in (m.upstream_model, m.catalog)), None)


def _images(images_raw: dict, source: str, refs: dict, env) -> ImagesConfig:
    key = images_raw.pop("signing_key", "")
    s3 = images_raw.pop("s3", None)
    directory = images_raw.pop("directory", "")
    store = images_raw.get("store", "filesystem")
    if store == "s3" and s3 is None:
        raise ConfigError(source, ["images", "s3"], "is required when images.store is s3 (bucket, region ...)")
    s3 = S3Config(**s3) if s3 is not None else None
    # Replicas share an S3 store: a random per-process key would make every URL minted by one
    # replica (or before a restart) fail on the others.
    if s3 is not None and store == "s3" and s3.urls == "gateway" and not key:
        names = refs.get("images.signing_key") or ["IMGPROXY_SIGNING_KEY"]
        raise ConfigError(
            source, ["images", "signing_key"],
            f"must be set when images.store is s3 with gateway URLs (replicas share the bucket): set {' or '.join(names)}",
        )
    if s3 is not None and s3.urls == "presigned" and images_raw.get("url_ttl", 3600) > 604800:
        raise ConfigError(source, ["images", "url_ttl"], "presigned S3 URLs last at most 604800 seconds (7 days)")
    return ImagesConfig(
        signing_key=key.encode(),
        s3=s3,
        directory=directory or default_directory(env),
        private_directory=not directory,
        **{k: v.rstrip("/") if k == "public_base_url" else v for k, v in images_raw.items()},
    )


def _check_capabilities(caps: Capabilities, source: str, path: list) -> None:
    if not caps.allows_size(caps.default_size):
        raise ConfigError(source, path + ["default_size"], f"{caps.default_size!r} is not among the sizes {list(caps.sizes)}")
    for value, allowed, key in (
        (caps.default_quality, caps.qualities, "default_quality"),
        (caps.default_style, caps.styles, "default_style"),
    ):
        if value is not None and value not in allowed:
            raise ConfigError(source, path + [key], f"{value!r} is not among {list(allowed)}")
