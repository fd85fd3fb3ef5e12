"""Published capabilities of the models imgproxy knows, so a config only names a provider.

Each entry uses the same keys as a model's `capabilities:` block in proxy.yaml, which is
merged over it key by key. Sources: OpenAI's Images API reference and Stability's v1 API.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Optional OpenAI parameters that only some models take; `prompt`, `model`, `n`, `size`,
# `quality`, `style`, `response_format`, `user` and `moderation` are checked separately.
OPTIONAL_PARAMETERS = ("background", "output_format", "output_compression", "stream", "partial_images")
# WIDTHxHEIGHT in ASCII digits, nothing before or after (int() would also take " 64", "64\n" or "٦٤").
CUSTOM_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")

SDXL_SIZES = (
    "1024x1024", "1152x896", "1216x832", "1344x768", "1536x640",
    "640x1536", "768x1344", "832x1216", "896x1152",
)

CATALOG: dict[str, dict] = {
    "dall-e-2": {
        "sizes": ["256x256", "512x512", "1024x1024"],
        "default_size": "1024x1024",
        "max_n": 10,
        "qualities": ["standard"],
        "default_quality": "standard",
        "styles": [],
        "max_prompt_length": 1000,
        "default_response_format": "url",
        "upstream_formats": ["url", "b64_json"],
        "parameters": [],
    },
    "dall-e-3": {
        "sizes": ["1024x1024", "1792x1024", "1024x1792"],
        "default_size": "1024x1024",
        "max_n": 1,
        "qualities": ["standard", "hd"],
        "default_quality": "standard",
        "styles": ["vivid", "natural"],
        "default_style": "vivid",
        "max_prompt_length": 4000,
        "default_response_format": "url",
        "upstream_formats": ["url", "b64_json"],
        "parameters": [],
    },
    "gpt-image-1": {
        "sizes": ["auto", "1024x1024", "1536x1024", "1024x1536"],
        "default_size": "auto",
        "max_n": 10,
        "qualities": ["auto", "low", "medium", "high"],
        "default_quality": "auto",
        "styles": [],
        "max_prompt_length": 32000,
        # OpenAI always returns base64 for GPT image models; SDK code written for them expects it.
        "default_response_format": "b64_json",
        "upstream_formats": ["b64_json"],
        "parameters": list(OPTIONAL_PARAMETERS),
        "upstream_moderation": True,
    },
    "stable-diffusion-xl-1024-v1-0": {
        "sizes": list(SDXL_SIZES),
        "default_size": "1024x1024",
        "max_n": 10,
        "qualities": ["standard", "hd"],
        "default_quality": "standard",
        "styles": ["vivid", "natural"],
        "max_prompt_length": 2000,
        "default_response_format": "url",
        "upstream_formats": ["b64_json"],
        "parameters": [],
    },
    "placeholder": {
        "sizes": ["256x256", "512x512", "1024x1024", "1792x1024", "1024x1792"],
        "custom_sizes": {"min": 64, "max": 2048, "multiple_of": 8},
        "default_size": "1024x1024",
        "max_n": 10,
        "qualities": ["standard", "hd"],
        "default_quality": "standard",
        "styles": ["vivid", "natural"],
        "default_style": "vivid",
        "max_prompt_length": 32000,
        "default_response_format": "url",
        "upstream_formats": ["b64_json"],
        "parameters": [],
    },
}

# A model that is in neither the catalog nor given capabilities gets these: conservative,
# so that an operator adding a new upstream model states what it can do.
GENERIC = {
    "sizes": ["1024x1024"],
    "default_size": "1024x1024",
    "max_n": 1,
    "qualities": [],
    "styles": [],
    "max_prompt_length": 4000,
    "default_response_format": "url",
    "upstream_formats": ["url", "b64_json"],
    "parameters": [],
}


@dataclass(frozen=True)
class CustomSizes:
    min: int
    max: int
    multiple_of: int

    def allows(self, width: int, height: int) -> bool:
        return all(self.min <= side <= self.max and side % self.multiple_of == 0 for side in (width, height))

    def describe(self) -> str:
        return f"any WIDTHxHEIGHT with sides from {self.min} to {self.max} in steps of {self.multiple_of}"


@dataclass(frozen=True)
class Capabilities:
    sizes: tuple[str, ...]
    default_size: str
    max_n: int
    qualities: tuple[str, ...]
    styles: tuple[str, ...]
    max_prompt_length: int
    default_response_format: str
    parameters: frozenset[str]
    custom_sizes: CustomSizes | None = None
    default_quality: str | None = None
    default_style: str | None = None
    upstream_moderation: bool = False
    # Which of url / b64_json the upstream itself can return; the gateway converts the rest.
    upstream_formats: tuple[str, ...] = ("url", "b64_json")

    def allows_size(self, size: str) -> bool:
        if size in self.sizes:
            return True
        if self.custom_sizes is None or size == "auto":
            return False
        match = CUSTOM_SIZE.fullmatch(size)
        return match is not None and self.custom_sizes.allows(int(match[1]), int(match[2]))

    @classmethod
    def from_dict(cls, spec: dict) -> "Capabilities":
        custom = spec.get("custom_sizes")
        return cls(
            sizes=tuple(spec["sizes"]),
            default_size=spec["default_size"],
            max_n=spec["max_n"],
            qualities=tuple(spec.get("qualities", ())),
            styles=tuple(spec.get("styles", ())),
            max_prompt_length=spec["max_prompt_length"],
            default_response_format=spec.get("default_response_format", "url"),
            parameters=frozenset(spec.get("parameters", ())),
            custom_sizes=CustomSizes(**custom) if custom else None,
            default_quality=spec.get("default_quality"),
            default_style=spec.get("default_style"),
            upstream_moderation=spec.get("upstream_moderation", False),
            upstream_formats=tuple(spec.get("upstream_formats", ("url", "b64_json"))),
        )


def capabilities_for(catalog_name: str, overrides: dict | None) -> Capabilities:
    base = CATALOG.get(catalog_name, GENERIC)
    return Capabilities.from_dict({**base, **(overrides or {})})
