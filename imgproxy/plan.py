"""What the core needs from one provider attempt, decided once before the adapter is called.

Adapters read the plan instead of gateway config and context flags: the format to ask for,
whether the answer may go to the client as it arrives, and whether base64 images are to be
decoded while reading (they will be hosted)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ImagesConfig
from .messages import ImageRequest
from .routing import Target


@dataclass(frozen=True, slots=True)
class Plan:
    # url or b64_json: what to ask the upstream for (None: the upstream takes no choice).
    upstream_format: str | None
    # An OpenAI-shaped answer in the format the client wants may be relayed unchanged.
    stream_through: bool
    # The images will be hosted by the gateway: decode base64 as it arrives, never hold it whole.
    decode_inline: bool


def plan_attempt(request: ImageRequest, target: Target, images: ImagesConfig, read_body: bool) -> Plan:
    """`read_body`: some plugin must see the whole answer (token-priced metering, an
    idempotent answer to keep, a plugin that rewrites every body)."""
    formats = target.model.capabilities.upstream_formats
    wanted = request.response_format
    if len(formats) == 1:
        upstream_format = formats[0]
    elif wanted == "url" and images.upstream_urls == "rehost":
        upstream_format = "b64_json"  # an image the gateway hosts anyway is best fetched inline (no second download)
    else:
        upstream_format = wanted
    stream_through = (
        not read_body and upstream_format == wanted and (wanted == "b64_json" or images.upstream_urls == "passthrough")
        and request.n <= target.model.capabilities.n_per_call  # several calls' answers are merged, not relayed
    )
    return Plan(upstream_format, stream_through, decode_inline=wanted == "url" and upstream_format == "b64_json")
