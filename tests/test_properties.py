"""Property tests (hypothesis): request-body validation and the image-URL check refuse with a
4xx GatewayError whatever they are given, and accept only what they should."""

import asyncio
import hashlib
import hmac
import json
import math

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from imgproxy import schemafiles, untrusted_json
from imgproxy.catalog import builtin_catalog
from imgproxy.errors import GatewayError
from imgproxy.gateway import Gateway
from imgproxy.stores import UrlSigner
from imgproxy.inline_images import InlineImageError, InlineImageReader
from imgproxy.server import check_image_url
from imgproxy.validation import check_capabilities, check_schema
from tests.conftest import gateway_config

SETTINGS = settings(max_examples=400, derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SCHEMA = schemafiles.load("image-generation-request.schema.json")
SCHEMA_VALIDATOR = schemafiles.validator(SCHEMA)
NAMES = list(SCHEMA["properties"])
MODELS = [*builtin_catalog(), "sdxl", "openai/dall-e-3", "dall-e-9", ""]
# Values a client might send for the known keys, good and bad, besides arbitrary JSON.
LIKELY = st.sampled_from(
    [None, 1, 2, 10, 11, 0, -1, 2.0, 2.5, True, "auto", "1024x1024", "512x512", "64x64", "640x360", "64x64\n", "hd", "high",
     "standard", "vivid", "url", "b64_json", "png", "webp", "transparent", "low", 100, 3, "x" * 1001, "a cat", "", "\ud800",
     10**30, float("nan"), float("inf")]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | LIKELY,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Schema-valid values per key, so that bodies get past the schema to the model's capabilities.
GOOD = {
    "n": st.none() | st.integers(1, 10), "quality": st.sampled_from(["standard", "hd", "low", "medium", "high", "auto", None]),
    "response_format": st.sampled_from(["url", "b64_json", None]), "style": st.sampled_from(["vivid", "natural", None]),
    "size": st.none() | st.sampled_from(["auto", "256x256", "1024x1024", "1792x1024", "640x360", "1000x1001"])
    | st.from_regex(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}", fullmatch=True),
    "user": st.text(max_size=20), "moderation": st.sampled_from(["auto", "low", None]),
    "background": st.sampled_from(["transparent", "opaque", "auto", None]), "output_format": st.sampled_from(["png", "jpeg", "webp", None]),
    "output_compression": st.none() | st.integers(0, 100), "stream": st.none() | st.booleans(), "partial_images": st.none() | st.integers(0, 3),
}
good_bodies = st.builds(
    lambda options, model, prompt: {**options, "model": model, "prompt": prompt},
    st.fixed_dictionaries({}, optional=GOOD),
    st.sampled_from(MODELS),
    st.text(min_size=1, max_size=40) | st.just("x" * 4001),
)
bodies = st.one_of(
    good_bodies,
    good_bodies,
    json_values,
    st.dictionaries(
        st.sampled_from(NAMES + ["seed", "prompt", "prompt"]) | st.text(max_size=6),
        json_values | LIKELY,
        max_size=8,
    ).map(lambda body: body if "prompt" in body or len(body) % 3 == 0 else {**body, "prompt": "a lighthouse"}),
    st.builds(lambda body, model: {**body, "model": model}, st.dictionaries(st.sampled_from(NAMES), LIKELY, max_size=6), st.sampled_from(MODELS)),
)


@pytest.fixture(scope="module")
def gateway():
    text = gateway_config("http://127.0.0.1:9", "http://127.0.0.1:9", "/tmp/imgproxy-properties")
    return asyncio.run(Gateway.load(text=text, env={}))


def validate(gateway, raw: bytes):
    """The request path's validation steps, in pipeline.generate_images' order."""
    try:
        body = untrusted_json.loads(raw, text_only=True)
    except ValueError:
        raise GatewayError(400, "not acceptable JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "not an object", code="invalid_json")
    check_schema(body)
    if body.get("model") is None:  # as pipeline.requested_model, with no default_model configured
        raise GatewayError(400, "Missing required parameter: 'model'.", code="missing_required_parameter")
    route = gateway.routing.resolve(body["model"])
    return check_capabilities(body, route)


@SETTINGS
@given(body=bodies)
def test_body_validation_refuses_with_4xx_only(gateway, body):
    raw = json.dumps(body).encode()  # NaN, Infinity and big integers included, as a client could send them
    try:
        request = validate(gateway, raw)
    except GatewayError as error:
        event(f"refused: {error.code}")  # --hypothesis-show-statistics shows the mix
        assert 400 <= error.status < 500 and error.code, error.envelope()
        json.dumps(error.envelope())  # renderable
        return
    event("accepted")
    # Accepted: then it was valid JSON within bounds, schema-valid, and what the model can do.
    assert SCHEMA_VALIDATOR.is_valid(body)
    caps = gateway.routing.resolve(request.model).model.capabilities
    assert 1 <= request.n <= caps.max_n and caps.allows_size(request.size)
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in body.values())
    json.dumps(body, allow_nan=False).encode()  # text all the way: no lone surrogate survives


@SETTINGS
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(raw=b"[" * 100_000)
@example(raw=b'{"a": ' + b"1" * 5000 + b"}")
@example(raw=b'"\\udc00"')
def test_the_parser_raises_only_value_errors(raw):
    try:
        untrusted_json.loads(raw, text_only=True)
    except ValueError:
        pass


@SETTINGS
@given(depth=st.integers(0, 3000), wrap=st.sampled_from(["[]", "{}"]))
def test_nesting_is_refused_exactly_beyond_the_bound(depth, wrap):
    raw = ('{"a":' * depth + "1" + "}" * depth) if wrap == "{}" else ("[" * depth + "1" + "]" * depth)
    if depth <= untrusted_json.MAX_DEPTH:
        untrusted_json.loads(raw)
    else:
        with pytest.raises(ValueError):
            untrusted_json.loads(raw)


KEY = b"property-test-key"
SIGNER = UrlSigner(KEY)
NOW = 1_800_000_000


def sign(name: str, expires: str) -> str:
    return hmac.new(KEY, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()


def mutate(data, name: str, expires: str, signature: str) -> tuple[str, str, str]:
    """A correctly signed URL with one part changed the way an attacker would try."""
    part = data.draw(st.sampled_from(["name", "expires", "signature"]))
    change = data.draw(
        st.sampled_from([str.upper, lambda s: s + "\n", lambda s: " " + s, lambda s: "0" + s, lambda s: s[:-1], lambda s: s[::-1], lambda s: s + "é"])
    )
    if part == "name":
        return change(name), expires, signature
    if part == "expires":
        return name, change(expires), signature
    return name, expires, change(signature)


@SETTINGS
@given(data=st.data())
def test_image_urls_are_accepted_only_when_signed_and_unexpired(data):
    kind = data.draw(st.sampled_from(["arbitrary", "signed", "mutated"]))
    name = data.draw(st.from_regex(r"[A-Za-z0-9_-]{24}\.png", fullmatch=True) | st.text(max_size=40))
    expires = str(data.draw(st.integers(NOW - 10**6, NOW + 10**6) | st.integers(-(10**30), 10**30)))
    signature = sign(name, expires)
    if kind == "arbitrary":
        expires = data.draw(st.just(expires) | st.text(max_size=30))
        signature = data.draw(st.just(signature) | st.text(max_size=70) | st.from_regex(r"[0-9a-f]{64}", fullmatch=True))
    elif kind == "mutated":
        name, expires, signature = mutate(data, name, expires, signature)
    query = {"expires": expires, "signature": signature}
    try:
        remaining = check_image_url(SIGNER, name, query, NOW)
    except GatewayError as error:
        event(f"{kind}: {error.code}")
        assert (error.status, error.code) in {(403, "invalid_signature"), (410, "url_expired")}
        if error.status == 410:  # only a correctly signed URL learns that it has expired
            assert signature == sign(name, expires) and int(expires) <= NOW
        return
    event(f"{kind}: accepted")
    assert signature == sign(name, expires)
    assert expires.isascii() and expires.isdigit() and not expires.startswith("0")
    assert remaining == int(expires) - NOW > 0


def test_signed_expired_and_forged_urls():
    name = "A" * 24 + ".png"
    future, past = str(NOW + 60), str(NOW - 60)
    assert check_image_url(SIGNER, name, {"expires": future, "signature": sign(name, future)}, NOW) == 60
    for expires, signature, status in [(past, sign(name, past), 410), (future, sign(name, past), 403)]:
        with pytest.raises(GatewayError) as caught:
            check_image_url(SIGNER, name, {"expires": expires, "signature": signature}, NOW)
        assert caught.value.status == status


answer_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda value, cut: json.dumps(value).encode()[:cut],
        st.fixed_dictionaries({"created": json_values, "data": st.lists(st.fixed_dictionaries({"b64_json": st.sampled_from(["aGk=", "aGk", "a\\/b=", "!!", ""]) | st.text(max_size=8)}), max_size=3)}),
        st.integers(0, 400),
    ),
)


@SETTINGS
@given(raw=answer_bytes, cuts=st.lists(st.integers(0, 400), max_size=4))
@example(raw=b'{"data": [{"b64_json": "aGk="}], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", cuts=[7, 30])
def test_the_inline_image_reader_raises_only_its_own_error(raw, cuts):
    """Any bytes, cut anywhere: the reader that decodes hosted images as they arrive either
    returns an object and its images or raises InlineImageError (which becomes a 502)."""
    reader = InlineImageReader()
    last = 0
    try:
        for cut in sorted(cuts):
            reader.feed(raw[last:cut])
            last = max(last, cut)
        reader.feed(raw[last:])
        body, images = reader.finish()
    except InlineImageError:
        return
    assert isinstance(body, dict) and all(isinstance(image, bytearray) for image in images)
