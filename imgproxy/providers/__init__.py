"""Built-in provider adapters, registered through the same hook a plugin would use."""

from ..hookspecs import hookimpl
from .azure_openai import AzureOpenAIProvider
from .bfl import BflProvider
from .google import GoogleGenAIProvider, VertexAIProvider
from .openai import OpenAIProvider
from .placeholder import PlaceholderProvider
from .stability import StabilityProvider

BUILTIN = (
    OpenAIProvider, AzureOpenAIProvider, StabilityProvider, PlaceholderProvider, BflProvider, GoogleGenAIProvider, VertexAIProvider,
)


@hookimpl
def imgproxy_register_providers(register):
    for adapter in BUILTIN:
        register(adapter.type, adapter)
