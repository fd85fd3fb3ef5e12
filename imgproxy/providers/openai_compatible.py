"""Any host that speaks OpenAI's Images API (Together, Fireworks, xAI, a self-hosted server,
another imgproxy): OpenAI's request and answer code, with the key in the header the host wants.

No built-in models: a model's capabilities come from its `capabilities:` block in proxy.yaml
(else the conservative GENERIC set, or a catalog entry of the same name, such as dall-e-3 behind
another imgproxy) and its price from cost.prices (else it is metered at $0, with a warning).
Options: `key_header` (default Authorization) and `key_prefix` (default "Bearer ").
"""

from __future__ import annotations

from .openai import OpenAIProvider


class OpenAICompatibleProvider(OpenAIProvider):
    type = "openai_compatible"
    models = {}

    def auth_headers(self, key: str) -> dict:
        options = self.config.options
        return {options.get("key_header", "Authorization"): options.get("key_prefix", "Bearer ") + key}
