"""Prometheus metrics. Label values are bounded: model, provider and key names from the config,
status codes, and reasons and kinds from fixed sets; never an end user, a prompt, a request id
or a model name a client made up."""

from __future__ import annotations

import os
import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from . import __version__
from .errors import UPSTREAM_ERROR_KINDS
from .resilience import STATES

# How one provider call ended: an answer, a provider failure, a refusal (4xx, content policy),
# or not made because the provider's circuit was open.
ATTEMPT_OUTCOMES = ("success", "failure", "refusal", "circuit_open")

# Image generation takes from a fraction of a second (placeholder, cached) to minutes.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120)

# Error codes that are policy refusals, by the reason label they are counted under.
REFUSAL_REASONS = {
    "rate_limit_exceeded": "rate_limited",
    "insufficient_quota": "budget",
    "content_policy_violation": "content_policy",
    "moderation_blocked": "content_policy",
    "moderation_level_not_allowed": "moderation_level",
    "user_cooling_down": "user_cooling_down",
    "model_not_allowed": "model_not_allowed",
    "moderation_unavailable": "moderation_unavailable",
}

# Why the HTTP parser refused a request (imgproxy.listener.parser_error_reason).
PARSER_ERROR_REASONS = ("header_too_large", "invalid_header", "bad_method", "bad_request_line", "bad_url", "bad_body", "malformed")

UNKNOWN = "unknown"  # label value for a model or key the request never resolved to

# Set for the workers of `imgproxy serve --workers N`: every process writes its samples to
# files there, and a scrape of any one of them reads them all (prometheus-client's
# multiprocess mode; gauges say how they combine: livesum, max).
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition(registry: CollectorRegistry) -> bytes:
    """The text a scrape gets: this process's registry, or the whole process group's."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "imgproxy_requests", "Image generation requests, by outcome.", ["model", "provider", "key", "status"], registry=registry
        )
        self.request_duration = Histogram(
            "imgproxy_request_duration_seconds", "Time to answer a generation request.", ["model", "provider"],
            buckets=DURATION_BUCKETS, registry=registry,
        )
        self.upstream_duration = Histogram(
            "imgproxy_upstream_duration_seconds", "Time the provider took, streaming included.", ["model", "provider"],
            buckets=DURATION_BUCKETS, registry=registry,
        )
        self.images = Counter("imgproxy_images_generated", "Images returned to clients.", ["model", "size", "quality"], registry=registry)
        self.cost = Counter("imgproxy_cost_usd", "Metered cost in US dollars.", ["key", "model", "provider"], registry=registry)
        self.refusals = Counter(
            "imgproxy_refused_requests", "Requests refused by policy before any upstream call.", ["key", "reason"], registry=registry
        )
        self.upstream_errors = Counter(
            "imgproxy_upstream_errors", "Failed provider calls, by kind.", ["provider", "kind"], registry=registry
        )
        self.in_flight = Gauge(
            "imgproxy_in_flight_requests", "Generation requests being served.", registry=registry, multiprocess_mode="livesum"
        )
        self.sent_bytes = Counter("imgproxy_response_bytes", "Response body bytes sent for generation requests.", ["model"], registry=registry)
        self.store_operations = Counter(
            "imgproxy_image_store_operations", "Image store operations, by result.", ["operation", "result"], registry=registry
        )
        self.config_reloads = Counter("imgproxy_config_reloads", "Config reload attempts, by result.", ["result"], registry=registry)
        self.config_loaded = Gauge(
            "imgproxy_config_last_reload_success_timestamp_seconds", "When the running config was loaded.", registry=registry,
            multiprocess_mode="max",
        )
        self.build_info = Gauge(
            "imgproxy_build_info", "Always 1; labels say what is running.", ["version", "python"], registry=registry, multiprocess_mode="max"
        )
        self.state_errors = Counter(
            "imgproxy_state_errors", "Shared-state operations that failed (Redis unreachable or too slow).", ["operation"], registry=registry
        )
        # The listeners' defences (imgproxy.listener) and the upstream byte budget (imgproxy.limits).
        self.http_connections = Gauge("imgproxy_http_connections", "Open client connections, by listener.", ["listener"], registry=registry)
        self.http_connections_refused = Counter(
            "imgproxy_http_connections_refused", "Connections closed at once: the listener was at its connection cap.", ["listener"], registry=registry
        )
        self.http_header_timeouts = Counter(
            "imgproxy_http_header_timeouts", "Connections closed for not sending a request's headers in time.", ["listener"], registry=registry
        )
        self.http_write_timeouts = Counter(
            "imgproxy_http_write_timeouts", "Connections dropped because the client stopped reading its answer.", ["listener"], registry=registry
        )
        self.http_parser_errors = Counter(
            "imgproxy_http_parser_errors", "Requests the HTTP parser refused, by reason.", ["reason"], registry=registry
        )
        self.upstream_buffer_bytes = Gauge(
            "imgproxy_upstream_buffer_bytes", "Bytes of upstream answers held while being read, all requests together.", registry=registry
        )
        self.upstream_buffer_refusals = Counter(
            "imgproxy_upstream_buffer_refusals", "Requests answered 503 because the upstream byte budget was full, by stage.", ["stage"],
            registry=registry,
        )
        self.upstream_attempts = Counter(
            "imgproxy_upstream_attempts", "Provider calls (retries and fallbacks included), by outcome.", ["provider", "outcome"], registry=registry
        )
        self.fallbacks = Counter(
            "imgproxy_fallbacks", "Requests a model passed on to one of its fallbacks.", ["from_model", "to_model"], registry=registry
        )
        self.circuit_state = Gauge(
            "imgproxy_provider_circuit_state", "Circuit breaker of a provider: 0 closed, 1 open, 2 half-open (the worst of its models').",
            ["provider"], registry=registry, multiprocess_mode="max",
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        for operation in ("put", "get", "sweep", "recreate", "evict"):
            for result in ("ok", "error"):
                self.store_operations.labels(operation, result)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        for reason in PARSER_ERROR_REASONS:
            self.http_parser_errors.labels(reason)
        for stage in ("admission", "reading"):
            self.upstream_buffer_refusals.labels(stage)
        self.config_loaded.set_to_current_time()
        self._children: dict = {}

    def prepare(self, config) -> None:
        """Every series whose labels a config fixes, at zero, so dashboards and alerts read 0
        rather than no data until the first failure."""
        for provider in config.providers:
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(provider, kind)
            for outcome in ATTEMPT_OUTCOMES:
                self.upstream_attempts.labels(provider, outcome)
            self.circuit_state.labels(provider).set(0)
        for model in config.models.values():
            for fallback in model.fallbacks:
                self.fallbacks.labels(model.name, config.model_named(fallback).name)

    def circuit_changed(self, provider: str, state: str) -> None:
        self.circuit_state.labels(provider).set(STATES.index(state))

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, remembered: label values are bounded, and `labels()` takes a
        lock and checks its arguments every time."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_request(self, ctx, status: int, seconds: float) -> None:
        target = ctx.target or ctx.route  # the target that served, or failed last
        model = target.model.name if target else UNKNOWN
        provider = target.provider.name if target else UNKNOWN
        key = ctx.identity.name if ctx.identity else UNKNOWN
        outcome = ctx.outcome
        child = self.child
        child(self.requests, model, provider, key, str(status)).inc()
        child(self.request_duration, model, provider).observe(seconds)
        child(self.sent_bytes, model).inc(outcome.bytes_sent)
        if outcome.upstream_seconds is not None:
            child(self.upstream_duration, model, provider).observe(outcome.upstream_seconds)
        if outcome.images and ctx.request is not None:
            child(self.images, model, ctx.request.size, ctx.request.quality or "").inc(outcome.images)
        if outcome.cost_usd:
            child(self.cost, key, model, provider).inc(outcome.cost_usd)
        if outcome.upstream_error_kind:
            child(self.upstream_errors, provider, outcome.upstream_error_kind).inc()
        elif outcome.error_code in REFUSAL_REASONS:
            child(self.refusals, key, REFUSAL_REASONS[outcome.error_code]).inc()
