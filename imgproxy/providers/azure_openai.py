"""Azure OpenAI: OpenAI's image models behind an Azure resource's deployments.

The wire format is OpenAI's with three differences: the deployment (a model's
`upstream_model`) is in the path and the API version in the query, there is no `model`
field, and the key goes in the `api-key` header (or, with `options.auth: bearer`, the
api_key value is an Entra ID token sent as `Authorization: Bearer`). Answers carry
Azure's content-filter annotations, so they are always parsed (never relayed as they are)
and a content-filter refusal keeps the filtered categories in its message. Everything else
about the answer is the OpenAI adapter's.
"""

from __future__ import annotations

import dataclasses
import re
from urllib.parse import quote, urlencode

from ..config import ConfigError, ProviderConfig
from ..errors import GatewayError, invalid_request
from ..messages import ImageRequest, ImagesResult, StreamedReply
from ..plan import Plan
from ..routing import Target
from .openai import OpenAIProvider

DEFAULT_API_VERSION = "2024-10-21"
API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")
AUTH_MODES = ("api_key", "bearer")
# Azure's content-filter refusals: the error code, or the inner error's code.
FILTER_CODES = frozenset({"content_policy_violation", "contentFilter", "moderation_blocked"})
INNER_FILTER_CODE = "ResponsibleAIPolicyViolation"
# The categories of Azure's content-filter results and the severities they may report:
# only these words reach the client's message.
FILTER_CATEGORIES = ("hate", "sexual", "violence", "self_harm", "profanity", "jailbreak")
SEVERITIES = frozenset({"safe", "very_low", "low", "medium", "high"})


class AzureOpenAIProvider(OpenAIProvider):
    type = "azure_openai"
    # Azure deployments run OpenAI's models: a model names its OpenAI catalog entry
    # (`catalog: dall-e-3`), whose capabilities and prices apply.
    models: dict = {}

    def __init__(self, config: ProviderConfig, upstream) -> None:
        super().__init__(config, upstream)
        options = config.options or {}
        self.api_version = options.get("api_version", DEFAULT_API_VERSION)
        self.auth = options.get("auth", "api_key")
        where = ["providers", config.name, "options"]
        if not isinstance(self.api_version, str) or not API_VERSION.fullmatch(self.api_version):
            raise ConfigError("<config>", [*where, "api_version"], "must be an Azure API version such as 2024-10-21 or 2025-04-01-preview")
        if self.auth not in AUTH_MODES:
            raise ConfigError("<config>", [*where, "auth"], f"must be {' or '.join(AUTH_MODES)}")
        unknown = sorted(set(options) - {"api_version", "auth", "max_parallel"})
        if unknown:
            raise ConfigError("<config>", [*where, unknown[0]], "unknown option (known: api_version, auth, max_parallel)")

    def endpoint(self, target: Target, operation: str = "generations") -> str:
        deployment = quote(target.model.upstream_model, safe="")  # one path segment, whatever its name
        query = urlencode({"api-version": self.api_version})
        return f"{self.config.base_url}/openai/deployments/{deployment}/images/{operation}?{query}"

    def auth_headers(self, key: str) -> dict:
        return {"Authorization": f"Bearer {key}"} if self.auth == "bearer" else {"api-key": key}

    def build_body(self, request: ImageRequest, target: Target, upstream_format: str | None) -> dict:
        if request.moderation != "auto":
            # Azure's content filter is set per deployment by the operator, never per request.
            raise invalid_request(
                f"'moderation' is not supported by {request.model}: its content filtering is configured on the Azure deployment.",
                param="moderation", code="unsupported_parameter",
            )
        body = super().build_body(request, target, upstream_format)
        del body["model"]  # the deployment decides
        body.pop("moderation", None)
        return body

    async def answer(self, request: ImageRequest, plan: Plan, resp) -> ImagesResult | StreamedReply:
        # Azure's answers carry content-filter annotations outside OpenAI's shape: parse them.
        return await super().answer(request, dataclasses.replace(plan, stream_through=False), resp)

    def parse(self, body: dict, request: ImageRequest, decoded=None) -> ImagesResult:
        """Images Azure's output filter withheld (no data, `content_filter_results` filtered)
        are left out; if that leaves none, the request was refused by the filter."""
        data = body.get("data")
        if isinstance(data, list):
            withheld = [item for item in data if isinstance(item, dict) and _withheld(item)]
            if withheld and len(withheld) == len(data):
                filtered = filtered_categories(withheld[0].get("content_filter_results"))
                message = "The generated image was filtered by the provider's content filter."
                if filtered:
                    message += f" Filtered categories: {', '.join(filtered)}."
                raise GatewayError(400, message, type="invalid_request_error", code="content_policy_violation")
            if withheld:
                body = {**body, "data": [item for item in data if not (isinstance(item, dict) and _withheld(item))]}
        return super().parse(body, request, decoded)

    def map_error(self, status: int, body: dict, resp) -> GatewayError:
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        inner = error.get("inner_error") if isinstance(error.get("inner_error"), dict) else {}
        if status == 400 and (error.get("code") in FILTER_CODES or inner.get("code") == INNER_FILTER_CODE):
            message = self.upstream_message(error.get("message"), status)
            filtered = filtered_categories(inner.get("content_filter_results"))
            if filtered:
                message = f"{message} Filtered categories: {', '.join(filtered)}."
            return GatewayError(400, message, type="invalid_request_error", code="content_policy_violation")
        if isinstance(error.get("code"), str) and error["code"].isdigit():
            # Azure's front door puts the HTTP status in `code` ("429", "401"): not a reason.
            body = {"error": {**error, "code": None}}
        return super().map_error(status, body, resp)


def _withheld(item: dict) -> bool:
    if isinstance(item.get("b64_json"), str) or isinstance(item.get("url"), str):
        return False
    return bool(filtered_categories(item.get("content_filter_results")))


def filtered_categories(results) -> list[str]:
    """`sexual (high)`, `jailbreak` ...: the categories Azure's filter blocked, in known words only."""
    if not isinstance(results, dict):
        return []
    named = []
    for category in FILTER_CATEGORIES:
        result = results.get(category)
        if not isinstance(result, dict) or result.get("filtered") is not True:
            continue
        severity = result.get("severity")
        named.append(f"{category} ({severity})" if severity in SEVERITIES else category)
    return named
