"""The generic machinery of model capabilities: what a model accepts, and the conservative
default for a model nobody described.

The models themselves come from the provider adapters: each adapter class carries its
`models` (capabilities and prices, each with its source and date), read from a YAML file next
to its module with `load_models`. A model's `capabilities:` block in proxy.yaml is merged
over its entry key by key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources

import yaml

# Optional OpenAI parameters that only some models take; `prompt`, `model`, `n`, `size`,
# `quality`, `style`, `response_format`, `user` and `moderation` are checked separately.
OPTIONAL_PARAMETERS = ("background", "output_format", "output_compression", "stream", "partial_images", "input_fidelity")
# Never left out under a model's `unsupported_parameters: drop` (nor are prompt, model, n and
# response_format, which every model takes): a client waiting for server-sent events must not
# get a JSON answer instead.
NEVER_DROPPED = frozenset({"stream"})
# WIDTHxHEIGHT in ASCII digits, nothing before or after (int() would also take " 64", "64\n" or "٦٤").
CUSTOM_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


@dataclass(frozen=True)
class ModelEntry:
    """One model a provider package knows: its capabilities (the keys of a `capabilities:`
    block) and its price (the keys of a `cost.prices` entry, or None), with where each came
    from: (source, date)."""

    capabilities: dict
    price: dict | None
    sources: dict
    # The provider's shutdown date and recommended replacement: {shutdown, replacement}, or {}.
    lifecycle: dict = field(default_factory=dict)


def load_models(package: str, filename: str) -> dict[str, ModelEntry]:
    """A provider package's catalog, from the YAML file `filename` next to its module: per
    model name, `capabilities` and optionally `price` (`free: true` for a model that costs
nothing) and `lifecycle` (`shutdown: YYYY-MM-DD`, `replacement: <model>`), each with a `source`
and a `date`."""
    raw = yaml.safe_load(resources.files(package.rpartition(".")[0]).joinpath(filename).read_text(encoding="utf-8"))
    entries = {}
    for name, spec in raw.items():
        sources, parts = {}, {}
        for part in ("capabilities", "price", "lifecycle"):
            block = dict(spec.get(part) or {})
            if not block:
                continue
            source, date = block.pop("source", None), block.pop("date", None)
            if not source or not date:
                raise ValueError(f"{filename}: {name}.{part} needs a source and a date")
            sources[part], parts[part] = (source, str(date)), block
        entries[name] = ModelEntry(parts["capabilities"], parts.get("price"), sources, parts.get("lifecycle", {}))
    return entries


def merged(adapters: Iterable) -> dict[str, ModelEntry]:
    """Every registered adapter's models, by name (a later adapter's entry wins)."""
    catalog: dict[str, ModelEntry] = {}
    for adapter in adapters:
        catalog.update(getattr(adapter, "models", None) or {})
    return catalog


def builtin_adapters() -> dict[str, type]:
    """The built-in adapter classes by type."""
    from .providers import BUILTIN  # the adapters import this module

    return {adapter.type: adapter for adapter in BUILTIN}


def builtin_catalog() -> dict[str, ModelEntry]:
    from .providers import BUILTIN  # the adapters import this module

    return merged(BUILTIN)


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
    # Optional further limits (GPT image 2: at most 3840x2160 worth of pixels, 1:3 to 3:1).
    max_pixels: int | None = None
    max_ratio: float | None = None

    def allows(self, width: int, height: int) -> bool:
        if self.max_pixels is not None and width * height > self.max_pixels:
            return False
        if self.max_ratio is not None and max(width, height) > self.max_ratio * min(width, height):
            return False
        return all(self.min <= side <= self.max and side % self.multiple_of == 0 for side in (width, height))

    def describe(self) -> str:
        limits = "".join(
            (
                f", at most {self.max_pixels} pixels" if self.max_pixels is not None else "",
                f", no side more than {self.max_ratio:g} times the other" if self.max_ratio is not None else "",
            )
        )
        return f"any WIDTHxHEIGHT with sides from {self.min} to {self.max} in steps of {self.multiple_of}{limits}"


@dataclass(frozen=True)
class UploadLimits:
    """What a model takes as input images for edits or variations (`edits:` / `variations:` in
    its capabilities): how many, how large, which kinds, a mask or not, square only or not."""

    max_images: int
    max_image_bytes: int
    image_types: tuple[str, ...] = ("png",)
    mask: bool = False
    square: bool = False
    # All input images together (None: max_images x max_image_bytes), for a provider that takes
    # them in one request body built in memory (Gemini's inline parts, BFL's base64 JSON).
    max_total_bytes: int | None = None

    @classmethod
    def from_dict(cls, spec: dict | None) -> "UploadLimits | None":
        if not spec:
            return None
        return cls(**{**spec, "image_types": tuple(spec.get("image_types", ("png",)))})


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
    # Input images for POST /v1/images/edits and /variations; None: the model does neither.
    edits: UploadLimits | None = None
    variations: UploadLimits | None = None
    # Images one upstream call makes at most (None: max_n); a larger n is fanned out into
    # parallel calls by the adapter (Provider.fan_out).
    max_n_per_call: int | None = None

    @property
    def n_per_call(self) -> int:
        return min(self.max_n_per_call or self.max_n, self.max_n)

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
            edits=UploadLimits.from_dict(spec.get("edits")),
            variations=UploadLimits.from_dict(spec.get("variations")),
            max_n_per_call=spec.get("max_n_per_call"),
        )


def capabilities_for(catalog_name: str, overrides: dict | None, catalog: dict[str, ModelEntry] | None = None) -> Capabilities:
    """`catalog`: the registered adapters' models (the built-in ones when None)."""
    entry = (builtin_catalog() if catalog is None else catalog).get(catalog_name)
    base = entry.capabilities if entry is not None else GENERIC
    return Capabilities.from_dict({**base, **(overrides or {})})
