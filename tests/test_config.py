"""proxy.yaml: substitution, validation with the key path named, and the resolved table."""

from pathlib import Path

import pytest

from imgproxy.config import ConfigError
from imgproxy.gateway import Gateway

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
providers:
  local: {type: placeholder}
models:
  placeholder: {provider: local}
"""


async def load(text: str, env: dict | None = None) -> Gateway:
    return await Gateway.load(text=text, env=env or {})


async def problem(text: str, env: dict | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        await load(text, env)
    return caught.value


async def test_shipped_proxy_yaml_is_valid():
    gateway = await Gateway.load(REPO / "proxy.yaml", env={})
    assert set(gateway.config.models) == {"dall-e-2", "dall-e-3", "gpt-image-1", "stable-diffusion-xl-1024-v1-0", "placeholder"}
    assert gateway.config.providers["openai"].base_url == "https://api.openai.com/v1"
    assert gateway.config.providers["stability"].base_url == "https://api.stability.ai"
    assert gateway.config.providers["openai"].api_key_vars == ("OPENAI_API_KEY",)


async def test_environment_substitution():
    text = MINIMAL + """
providers:
  openai: {type: openai, base_url: "${BASE:-https://default.example/v1}", api_key: "${KEY}"}
  local: {type: placeholder}
images:
  signing_key: "a$$b-${EMPTY:-fallback}-${SET:-unused}"
"""
    gateway = await load(text, {"KEY": "sk-from-env", "EMPTY": "", "SET": "given"})
    openai = gateway.config.providers["openai"]
    assert (openai.base_url, openai.api_key) == ("https://default.example/v1", "sk-from-env")
    assert gateway.config.images.signing_key == b"a$b-fallback-given"
    error = await problem(text, {})
    assert error.path == "providers.openai.api_key" and "KEY is not set" in error.problem


@pytest.mark.parametrize(
    "text, path, words",
    [
        (MINIMAL + "colour: blue\n", "colour", "unknown key"),
        (MINIMAL + "server: {port: eighty}\n", "server.port", "must be of type integer, not string"),
        (MINIMAL + "server: {prot: 80}\n", "server.prot", "unknown key"),
        ("providers: {local: {type: placeholder}}\n", "models", "is required"),
        (MINIMAL.replace("{type: placeholder}", "{type: placeholder, timeouts: {total: -1}}"), "providers.local.timeouts.total", "-1"),
        (MINIMAL.replace("type: placeholder", "type: dalle-service"), "providers.local.type", "unknown provider type 'dalle-service' (known: "),
        (MINIMAL.replace("{provider: local}", "{provider: nowhere}"), "models.placeholder.provider", "no provider named 'nowhere'"),
        (MINIMAL.replace("{provider: local}", "{provider: local, aliases: [placeholder]}"), "models.placeholder", "already used"),
        (MINIMAL + "default_model: dall-e-3\n", "default_model", "no model or alias named 'dall-e-3'"),
        (MINIMAL.replace("{type: placeholder}", "{type: placeholder, base_url: 'ftp://x'}"), "providers.local.base_url", "http(s) URL"),
        (MINIMAL + "images: {upstream_urls: sometimes}\n", "images.upstream_urls", "must be one of"),
        (MINIMAL.replace("{provider: local}", "{provider: local, capabilities: {default_size: 3x3}}"), "models.placeholder.capabilities.default_size", "not among the sizes"),
        (MINIMAL + "plugins: {enable: [not-installed]}\n", "plugins.enable", "no installed plugin"),
        (MINIMAL + "plugins: {disable: [ratelimiter]}\n", "plugins.disable", "not a built-in plugin"),
        ("models: [a, b\n", "line 2, column 1", "not valid YAML"),
        ("- a list\n", "(top level)", "must be a mapping"),
    ],
)
async def test_errors_name_the_key_path(text, path, words):
    error = await problem(text)
    assert error.path == path
    assert words in error.problem
    assert str(error).startswith(f"<config>: {path}: ")


async def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        await Gateway.load(tmp_path / "missing.yaml")
    assert caught.value.path == "(file)" and str(tmp_path / "missing.yaml") in str(caught.value)


async def test_capabilities_override_the_catalog_and_new_models():
    text = """
providers:
  openai: {type: openai, base_url: "https://api.openai.com/v1", api_key: k}
models:
  dall-e-2: {provider: openai, capabilities: {max_n: 2, sizes: [256x256], default_size: 256x256}}
  house-model:
    provider: openai
    upstream_model: dall-e-3
    aliases: [house]
  brand-new: {provider: openai, upstream_model: gpt-image-9, free: true}
"""
    gateway = await load(text)
    caps = gateway.config.models["dall-e-2"].capabilities
    assert (caps.max_n, caps.sizes, caps.max_prompt_length) == (2, ("256x256",), 1000)
    assert gateway.routing.resolve("house").model.capabilities.styles == ("vivid", "natural")
    assert gateway.routing.resolve("openai/dall-e-3").model.name == "house-model"
    assert gateway.routing.resolve("openai/house").model.name == "house-model"
    assert gateway.config.models["brand-new"].capabilities.max_n == 1  # a conservative generic entry


async def test_disabling_auth_serves_without_keys_and_refuses_its_section():
    gateway = await load(MINIMAL + "plugins: {disable: [auth]}\n")
    assert gateway.pm.get_plugin("auth") is None
    error = await problem(MINIMAL + "plugins: {disable: [auth]}\nauth: {api_keys: x}\n")
    assert error.path == "auth" and error.problem == "unknown key"


async def test_the_commented_two_key_example_in_proxy_yaml_is_valid():
    lines = (REPO / "proxy.yaml").read_text().splitlines()
    start = lines.index("  # keys:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append("  " + line[4:])
    text = "\n".join(lines[:start] + block + lines[start + len(block):])
    gateway = await Gateway.load(text=text, env={"DESIGN_TEAM_KEY": "sk-design-team-key-000"})
    auth = gateway.pm.get_plugin("auth")
    settings = {key.name: key.settings for key in auth.keys}
    assert settings["design-team"]["budget"] == {"daily_usd": 50, "monthly_usd": 1000}
    assert settings["batch-jobs"]["rate_limit"]["per_user"] is True
    assert settings["batch-jobs"]["moderation_levels"] == ["auto"]  # from key_defaults
