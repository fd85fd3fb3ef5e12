"""Built-in provider adapters, registered through the same hook a plugin would use."""

from ..hookspecs import hookimpl
from .azure_openai import AzureOpenAIProvider
from .openai import OpenAIProvider
from .placeholder import PlaceholderProvider
from .stability import StabilityProvider

BUILTIN = (OpenAIProvider, StabilityProvider, PlaceholderProvider, AzureOpenAIProvider)


@hookimpl
def imgproxy_register_providers(register):
    for adapter in BUILTIN:
        register(adapter.type, adapter)
