"""The hook chain: order, async hooks, refusals, and a third-party plugin installed by pip."""

import base64
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from imgproxy import hookspecs
from imgproxy.errors import GatewayError
from imgproxy.hookspecs import hookimpl
from imgproxy.messages import Identity
from tests.conftest import AUTH, assert_error, images_body

URL = "/v1/images/generations"
BODY = {"model": "dall-e-3", "prompt": "a lighthouse", "response_format": "b64_json"}
REPO = Path(__file__).resolve().parents[1]


class Recorder:
    """Implements every request hook, some sync and some async, and records the calls."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[str] = []
        self.refuse = refuse
        self.outcome = None

    @hookimpl
    def imgproxy_authenticate(self, ctx):
        self.calls.append("authenticate")
        return None  # not ours: the auth plugin decides

    @hookimpl
    def imgproxy_authorize_request(self, ctx):
        self.calls.append(f"authorize_request:{ctx.identity.name}:{ctx.request.model}")

    @hookimpl
    async def imgproxy_check_limits(self, ctx):
        self.calls.append("check_limits")

    @hookimpl
    async def imgproxy_check_content(self, ctx):
        self.calls.append("check_content")
        if self.refuse:
            raise GatewayError(403, "Refused by policy.", code="policy_refused")
        ctx.needs_body = True  # so the rewrite hook sees even a pass-through answer

    @hookimpl
    async def imgproxy_rewrite_response(self, ctx, result):
        self.calls.append(f"rewrite_response:{len(result.images)}")
        for image in result.images:
            image.revised_prompt = "rewritten"

    @hookimpl
    def imgproxy_record_usage(self, ctx, outcome):
        self.calls.append(f"record_usage:{outcome.status}")
        self.outcome = outcome


async def test_hooks_run_in_order(make_client, fake_openai):
    recorder = Recorder()
    client = await make_client(plugins=[recorder])
    body = await images_body(await client.post(URL, json=BODY, headers=AUTH))
    assert body["data"][0]["revised_prompt"] == "rewritten"
    assert recorder.calls == [
        "authenticate", "authorize_request:team-a:dall-e-3", "check_limits", "check_content", "rewrite_response:1", "record_usage:200"
    ]
    assert recorder.outcome.images == 1 and recorder.outcome.upstream_seconds > 0


async def test_a_refusal_stops_before_the_upstream_and_is_recorded(make_client, fake_openai):
    recorder = Recorder(refuse=True)
    client = await make_client(plugins=[recorder])
    error = await assert_error(await client.post(URL, json=BODY, headers=AUTH), 403, "policy_refused")
    assert error["message"] == "Refused by policy."
    assert fake_openai.requests == []
    assert recorder.calls[-1] == "record_usage:403" and recorder.outcome.error_code == "policy_refused"


async def test_record_usage_sees_upstream_failures(make_client, fake_openai):
    recorder = Recorder()
    client = await make_client(plugins=[recorder])
    fake_openai.cue(status=500, body={})
    await assert_error(await client.post(URL, json=BODY, headers=AUTH), 502, "upstream_error")
    assert recorder.calls[-1] == "record_usage:502"


async def test_streamed_answers_are_counted_without_a_rewrite(make_client):
    class Counter:
        outcome = None

        @hookimpl
        def imgproxy_record_usage(self, ctx, outcome):
            Counter.outcome = outcome

    client = await make_client(plugins=[Counter()])
    await images_body(await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "n": 3}, headers=AUTH))
    assert Counter.outcome.images == 3 and Counter.outcome.usage["total_tokens"] == 100
    assert Counter.outcome.bytes_sent > 0
    resp = await client.post(URL, json={"model": "gpt-image-1", "prompt": "x", "stream": True, "partial_images": 2}, headers=AUTH)
    await resp.read()
    assert Counter.outcome.images == 1 and Counter.outcome.usage["output_tokens"] == 50


async def test_a_failing_record_usage_hook_does_not_fail_the_request(make_client, caplog):
    class Broken:
        @hookimpl
        async def imgproxy_record_usage(self, ctx, outcome):
            raise RuntimeError("billing database down")

    client = await make_client(plugins=[Broken()])
    await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH))
    assert "billing database down" in caplog.text


async def test_first_identity_wins_and_later_async_hooks_are_not_awaited(make_client):
    class HeaderAuth:
        @hookimpl(tryfirst=True)
        async def imgproxy_authenticate(self, ctx):
            if ctx.http.headers.get("X-Internal-Service") == "renderer":
                return Identity("renderer")
            return None

    seen = []

    class Seen:
        @hookimpl
        def imgproxy_authorize_request(self, ctx):
            seen.append(ctx.identity.name)

    client = await make_client(plugins=[HeaderAuth(), Seen()])
    await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers={"X-Internal-Service": "renderer"}))
    await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH))
    assert seen == ["renderer", "team-a"]


async def test_rewrite_plugin_disabled_is_a_clear_error_for_conversions(make_client, config_text):
    client = await make_client(config_text(extra="plugins: {disable: [rewrite]}"))
    error = await assert_error(await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers=AUTH), 500, "internal_error")
    assert "rewrite plugin" in error["message"]
    await images_body(await client.post(URL, json={"model": "placeholder", "prompt": "x", "response_format": "b64_json"}, headers=AUTH))


PLUGIN_SOURCE = '''
import base64
import time

from imgproxy.errors import GatewayError
from imgproxy.hookspecs import hookimpl
from imgproxy.messages import GeneratedImage, ImagesResult
from imgproxy.providers.base import Provider

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


class EchoProvider(Provider):
    type = "echo"
    needs_key = False

    async def generate(self, request, target, plan, call):
        images = [GeneratedImage(b64_json=base64.b64encode(PNG).decode(), revised_prompt=request.prompt.upper())]
        return ImagesResult(created=int(time.time()), images=images)


class ExamplePlugin:
    def __init__(self):
        self.banned = ()

    @hookimpl
    def imgproxy_register_providers(self, register):
        register("echo", EchoProvider)

    @hookimpl
    def imgproxy_config_schema(self):
        return {"example": {"type": "object", "additionalProperties": False,
                            "properties": {"banned_words": {"type": "array", "items": {"type": "string"}}}}}

    @hookimpl
    def imgproxy_key_schema(self):
        return {"example_banned": {"type": "array", "items": {"type": "string"}}}

    @hookimpl
    def imgproxy_configure(self, gateway):
        self.banned = tuple(gateway.config.sections.get("example", {}).get("banned_words", []))

    @hookimpl
    async def imgproxy_check_content(self, ctx):
        for word in self.banned + tuple(ctx.identity.settings.get("example_banned", ())):
            if word in ctx.request.prompt:
                raise GatewayError(400, f"The word {word!r} is not allowed here.", code="banned_word", param="prompt")
'''


def install_wheel(root: Path, module: str, source: str, entry_points: str) -> Path:
    """Build a wheel for a small third-party distribution and pip-install it into a folder."""
    wheel = root / f"{module}-0.1-py3-none-any.whl"
    info = f"{module}-0.1.dist-info"
    files = {
        f"{module}.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": "[imgproxy]\n" + entry_points,
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n")
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--disable-pip-version-check", "--target", str(target), str(wheel)],
        check=True,
    )
    return target


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    return install_wheel(
        tmp_path_factory.mktemp("thirdparty"), "imgproxy_example_plugin", PLUGIN_SOURCE, "example = imgproxy_example_plugin:ExamplePlugin\n"
    )


PLUGIN_CONFIG = """
plugins: {enable: [example]}
example: {banned_words: [lighthouse]}
"""


async def test_third_party_plugin_from_its_entry_point(installed_plugin, monkeypatch, make_client, config_text):
    monkeypatch.syspath_prepend(str(installed_plugin))
    text = config_text(extra=PLUGIN_CONFIG).replace("  placeholder:\n    type: placeholder", "  placeholder:\n    type: placeholder\n  mine:\n    type: echo")
    text = text.replace("models:\n", "models:\n  echo-1: {provider: mine, free: true}\n")
    client = await make_client(text)
    body = await images_body(await client.post(URL, json={"model": "echo-1", "prompt": "hello", "response_format": "b64_json"}, headers=AUTH))
    assert body["data"][0]["revised_prompt"] == "HELLO"
    assert base64.b64decode(body["data"][0]["b64_json"]).startswith(b"\x89PNG")
    error = await assert_error(await client.post(URL, json={"model": "echo-1", "prompt": "a lighthouse"}, headers=AUTH), 400, "banned_word", "prompt")
    assert "lighthouse" in error["message"]
    # A per-key setting the plugin declared, on the key entry of the auth section.
    client = await make_client(text.replace("      key: sk-client-test-key-0001", "      key: sk-client-test-key-0001\n      example_banned: [cat]"))
    await assert_error(await client.post(URL, json={"model": "echo-1", "prompt": "a cat"}, headers=AUTH), 400, "banned_word", "prompt")


async def test_third_party_plugin_is_off_unless_enabled(installed_plugin, monkeypatch, make_client, config_text):
    from imgproxy.config import ConfigError

    monkeypatch.syspath_prepend(str(installed_plugin))
    client = await make_client()
    assert client.gateway.pm.get_plugin("example") is None
    with pytest.raises(ConfigError) as caught:
        await make_client(config_text(extra="example: {banned_words: [x]}"))
    assert caught.value.path == "example"
    with pytest.raises(ConfigError) as caught:
        await make_client(config_text(extra=PLUGIN_CONFIG.replace("banned_words", "banned")))
    assert caught.value.path == "example.banned"


def test_every_hook_is_documented_and_tested():
    docs = (REPO / "docs" / "plugins.md").read_text()
    tests = "".join(path.read_text() for path in (REPO / "tests").glob("test_*.py"))
    names = [name for name in dir(hookspecs) if name.startswith("imgproxy_")]
    assert len(names) == 14  # with imgproxy_authorize_model (GET /v1/models) and imgproxy_change_target (fallbacks)
    for name in names:
        assert f"`{name}" in docs, f"{name} is not documented in docs/plugins.md"
        assert f"def {name}(" in tests or f"def {name}(" in PLUGIN_SOURCE, f"no test implements {name}"


async def test_startup_and_shutdown_hooks(make_client):
    events = []

    class Lifecycle:
        @hookimpl
        async def imgproxy_startup(self, gateway):
            events.append(("startup", len(gateway.config.models)))

        @hookimpl
        def imgproxy_shutdown(self, gateway):
            events.append(("shutdown", len(gateway.config.models)))

    client = await make_client(plugins=[Lifecycle()])
    assert events == [("startup", 5)]
    await client.close()
    assert events == [("startup", 5), ("shutdown", 5)]


# A distribution that tries to take over built-in names: its `auth` lets every caller in, its
# `cost` would meter nothing.
IMPOSTOR_SOURCE = '''
from imgproxy.hookspecs import hookimpl
from imgproxy.messages import Identity


class OpenDoor:
    @hookimpl(tryfirst=True)
    def imgproxy_authenticate(self, ctx):
        return Identity("impostor")


class NoCost:
    pass
'''


@pytest.fixture(scope="module")
def installed_impostor(tmp_path_factory):
    return install_wheel(
        tmp_path_factory.mktemp("impostor"), "imgproxy_impostor", IMPOSTOR_SOURCE,
        "auth = imgproxy_impostor:OpenDoor\ncost = imgproxy_impostor:NoCost\nexample = imgproxy_impostor:NoCost\n",
    )


async def test_an_installed_entry_point_named_like_a_built_in_does_not_replace_it(installed_impostor, monkeypatch, make_client):
    from importlib.metadata import entry_points

    from imgproxy.plugins.auth import AuthPlugin
    from imgproxy.plugins.cost import CostPlugin

    # Behind imgproxy on the path, where a name-keyed lookup of the entry points let it win.
    monkeypatch.setattr(sys, "path", [*sys.path, str(installed_impostor)])
    # The impostor is visible to importlib.metadata: the gateway must not take it from there.
    assert "imgproxy_impostor:OpenDoor" in {ep.value for ep in entry_points(group="imgproxy", name="auth")}
    client = await make_client()
    assert type(client.gateway.pm.get_plugin("auth")) is AuthPlugin
    assert type(client.gateway.pm.get_plugin("cost")) is CostPlugin
    await assert_error(await client.post(URL, json={"model": "placeholder", "prompt": "x"}, headers={"Authorization": "Bearer sk-anyone-at-all-000000"}), 401, "invalid_api_key")
    resp = await client.post(URL, json=BODY, headers=AUTH)
    await images_body(resp)
    assert float(resp.headers["x-imgproxy-cost-usd"]) > 0  # the real cost plugin metered it


@pytest.mark.parametrize("name", ["auth", "cost", "rewrite"])
async def test_enabling_a_built_in_name_is_refused(installed_impostor, monkeypatch, make_client, config_text, name):
    from imgproxy.config import ConfigError

    monkeypatch.syspath_prepend(str(installed_impostor))
    with pytest.raises(ConfigError) as caught:
        await make_client(config_text(extra=f"plugins: {{enable: [{name}]}}"))
    assert caught.value.path == "plugins.enable"
    assert f"'{name}' is the name of a built-in plugin" in str(caught.value)


async def test_a_plugin_name_two_distributions_declare_is_refused(installed_plugin, installed_impostor, monkeypatch, make_client, config_text):
    from imgproxy.config import ConfigError

    monkeypatch.syspath_prepend(str(installed_plugin))
    monkeypatch.syspath_prepend(str(installed_impostor))
    with pytest.raises(ConfigError) as caught:
        await make_client(config_text(extra=PLUGIN_CONFIG))
    message = str(caught.value)
    assert "more than one installed distribution declares the plugin 'example'" in message
    assert "imgproxy_impostor:NoCost" in message and "imgproxy_example_plugin:ExamplePlugin" in message


async def test_a_plugin_implementing_an_unknown_hook_is_refused(make_client):
    from imgproxy.config import ConfigError

    class Retired:
        """Written for the single check hook that the three phases replaced."""

        @hookimpl
        def imgproxy_check_request(self, ctx):
            raise GatewayError(403, "Refused by policy.", code="policy_refused")

    with pytest.raises(ConfigError) as caught:
        await make_client(plugins=[Retired()])
    assert "imgproxy_check_request" in str(caught.value) and "does not have" in str(caught.value)


def test_hook_semantics_come_from_the_specs():
    import inspect

    from imgproxy.pluginmanager import build_plugin_manager

    pm = build_plugin_manager()
    first = {name for name in dir(hookspecs) if name.startswith("imgproxy_") and getattr(pm.hook, name).spec.opts["firstresult"]}
    assert first == {"imgproxy_authenticate"}
    assert getattr(hookspecs.imgproxy_record_usage, "imgproxy_guarded", False)
    # Typed: every parameter and the result of every spec is annotated.
    for name in dir(hookspecs):
        if name.startswith("imgproxy_"):
            signature = inspect.signature(getattr(hookspecs, name))
            assert signature.return_annotation is not inspect.Signature.empty, name
            assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values()), name


async def test_guarded_and_first_result_semantics_hold_without_the_caller_choosing(make_client, caplog):
    from imgproxy.messages import RequestContext

    identities = []

    class Second:
        @hookimpl
        async def imgproxy_authenticate(self, ctx):
            identities.append("second called")
            return Identity("second")

    class First:
        @hookimpl(tryfirst=True)
        async def imgproxy_authenticate(self, ctx):
            return Identity("first")

        @hookimpl(tryfirst=True)
        def imgproxy_record_usage(self, ctx, outcome):
            raise RuntimeError("first recorder broke")

    recorded = []

    class Later:
        @hookimpl(trylast=True)
        def imgproxy_record_usage(self, ctx, outcome):
            recorded.append(outcome)

    client = await make_client(plugins=[Second(), First(), Later()])
    ctx = RequestContext(gateway=client.gateway, http=None, request_id="t")
    assert (await client.gateway.hooks.call("imgproxy_authenticate", ctx=ctx)).name == "first"
    assert identities == []
    await client.gateway.hooks.call("imgproxy_record_usage", ctx=ctx, outcome=ctx.outcome)
    assert recorded == [ctx.outcome] and "first recorder broke" in caplog.text


def test_the_declared_built_in_entry_points_match_what_is_loaded():
    import tomllib

    from imgproxy.pluginmanager import DEFAULT_PLUGINS

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["imgproxy"]
    assert declared == DEFAULT_PLUGINS
