"""Built-in provider adapters, registered through the same hook a plugin would use."""

from ..hookspecs import hookimpl
from .azure_openai import AzureOpenAIProvider
from .bfl import BflProvider
from .google import GoogleGenAIProvider, VertexAIProvider
from .openai import OpenAIProvider
from .openai_compatible import OpenAICompatibleProvider
from .placeholder import PlaceholderProvider
from .stability import StabilityProvider
from .stability_v2 import StabilityV2Provider

BUILTIN = (
    OpenAIProvider, AzureOpenAIProvider, OpenAICompatibleProvider, StabilityProvider, StabilityV2Provider, PlaceholderProvider,
    BflProvider, GoogleGenAIProvider, VertexAIProvider,
)


@hookimpl
def imgproxy_register_providers(register):
    for adapter in BUILTIN:
        register(adapter.type, adapter)
