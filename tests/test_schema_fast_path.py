"""The compiled request-body check agrees with jsonschema on the shipped schema."""

import random

from jsonschema import Draft202012Validator

from imgproxy import schemafiles

SCHEMA = schemafiles.load("image-generation-request.schema.json")
VALUES = [
    None, True, False, 0, 1, 2, 3, 4, 10, 11, -1, 1.0, 2.5, 100, 101, "", "x", "a cat", "url", "b64_json", "png", "auto", "low",
    "hd", "standard", "vivid", "natural", "1024x1024", "0x5", "1024x", "99999x1", "123456x1", "transparent", "webp", [], {}, ["url"],
    "u" * 256, "u" * 257,
]


GOOD = {
    "model": ["dall-e-3", None], "n": [1, 4, None], "quality": ["hd", "auto", None], "response_format": ["url", None],
    "size": ["1024x1024", "auto", None], "style": ["vivid", None], "user": ["u-1"], "moderation": ["low", None],
    "background": ["opaque", None], "output_format": ["webp", None], "output_compression": [0, 100, None],
    "stream": [True, None], "partial_images": [0, 3, None],
}


def random_body(rng: random.Random) -> object:
    if rng.random() < 0.03:
        return rng.choice([[], "body", 3, None])
    names = list(SCHEMA["properties"]) + ["seed", "prompt"]
    mostly_good = rng.random() < 0.5
    body = {}
    for name in rng.sample(names, rng.randint(0, 6)):
        pool = GOOD.get(name, VALUES) if mostly_good and rng.random() < 0.9 else VALUES
        body[name] = rng.choice(pool)
    if rng.random() < 0.8:
        body["prompt"] = rng.choice(["a lighthouse", "a lighthouse", "", 5, None])
    return body


def test_the_shipped_schema_compiles():
    assert schemafiles.compile_flat_object(SCHEMA) is not None


def test_agrees_with_jsonschema_on_random_bodies():
    is_valid = schemafiles.compile_flat_object(SCHEMA)
    reference = Draft202012Validator(SCHEMA)
    rng = random.Random(20261125)
    valid = 0
    for _ in range(20000):
        body = random_body(rng)
        expected = reference.is_valid(body)
        assert is_valid(body) == expected, body
        valid += expected
    assert 2000 < valid < 18000  # both kinds were exercised


def test_schemas_it_cannot_compile():
    assert schemafiles.compile_flat_object({"type": "object", "properties": {"a": {"$ref": "#/x"}}, "additionalProperties": False}) is None
    assert schemafiles.compile_flat_object({"type": "object", "properties": {}}) is None  # open objects
    assert schemafiles.compile_flat_object({"type": "object", "anyOf": [], "additionalProperties": False}) is None
