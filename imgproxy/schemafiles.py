"""Loading the JSON Schema files shipped in `schemas/`, and turning their errors into words."""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources

import jsonschema
from jsonschema import Draft202012Validator


@cache
def load(name: str) -> dict:
    return json.loads(resources.files("imgproxy.schemas").joinpath(name).read_text("utf-8"))


@cache
def ecma_regex(pattern: str) -> re.Pattern:
    r"""A JSON Schema `pattern` (ECMA-262) as a Python regex. In ECMA-262 `$` is the end of the
    string; Python's `$` also matches before a final newline, so "64x64\n" would pass
    "^[0-9]+x[0-9]+$". Every `$` outside a character class becomes `\Z`."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        token = pattern[i : i + 2] if pattern[i] == "\\" else pattern[i]
        i += len(token)
        if in_class:
            in_class = token != "]"
        elif token == "[":
            in_class = True
        elif token == "$":
            token = r"\Z"
        out.append(token)
    return re.compile("".join(out))


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not ecma_regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


# Draft 2020-12 with ECMA-262 semantics for `pattern`, as JSON Schema specifies.
_Validator = jsonschema.validators.extend(Draft202012Validator, {"pattern": _pattern})


def validator(schema: dict) -> Draft202012Validator:
    _Validator.check_schema(schema)
    return _Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def first_error(validator: Draft202012Validator, instance) -> tuple[list, str] | None:
    """The most relevant error as (key path, message), or None when the instance is valid."""
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return None
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        if extra:
            return path + [extra[0]], "unknown key"
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in error.instance]
        if missing:
            return path + [missing[0]], "is required"
    return path, _describe(error)


def _describe(error: jsonschema.ValidationError) -> str:
    """The problem in words built from the schema keyword, never from jsonschema's message:
    that one quotes the value (`'s3cr3t' is too short`), and a value may be a secret."""
    keyword, wanted, value = error.validator, error.validator_value, error.instance
    if keyword == "type":
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        return f"must be of type {wanted}, not {_json_type(value)}"
    if keyword == "oneOf" and all(set(branch) == {"required"} for branch in wanted):
        names = [name for branch in wanted for name in branch["required"]]
        return "needs exactly one of: " + ", ".join(names)
    if keyword == "enum":
        return "must be one of " + ", ".join(json.dumps(v) for v in wanted)
    # Numbers are shown (a ${VAR} always gives a string); strings and containers never are.
    number = f", not {json.dumps(value)}" if type(value) in (int, float) else ""
    words = {
        "const": f"must be {json.dumps(wanted)}",
        "minimum": f"must be at least {wanted}{number}",
        "maximum": f"must be at most {wanted}{number}",
        "exclusiveMinimum": f"must be greater than {wanted}{number}",
        "exclusiveMaximum": f"must be less than {wanted}{number}",
        "multipleOf": f"must be a multiple of {wanted}{number}",
        "minLength": f"must be at least {wanted} characters long",
        "maxLength": f"must be at most {wanted} characters long",
        "pattern": f"must match the pattern {wanted}",
        "format": f"must be a valid {wanted}",
        "minItems": f"must have at least {wanted} items",
        "maxItems": f"must have at most {wanted} items",
        "uniqueItems": "must not repeat an item",
        "minProperties": f"must have at least {wanted} keys",
        "maxProperties": f"must have at most {wanted} keys",
        "oneOf": "must match exactly one of the allowed forms",
        "anyOf": "must match one of the allowed forms",
        "not": "is a form that is not allowed",
    }
    return words.get(keyword, f"is not valid ({keyword})")


def _json_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), "null"
    )


def dotted(path: list) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


# A fast path for the request body. jsonschema walks a generic keyword tree on every call,
# about 130 µs for a request; the body schema is a flat object of simple properties, which
# compiles into a few type and range checks. Only a body the compiled check refuses goes to
# jsonschema, for its precise error. A schema using anything else is not compiled.
_FLAT_OBJECT_KEYS = {"$schema", "$id", "title", "description", "type", "additionalProperties", "required", "properties"}
_PROPERTY_KEYS = {"description", "type", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern"}
_TYPE_CHECKS = {
    "string": lambda v: type(v) is str,
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
    "integer": lambda v: type(v) is int or (type(v) is float and v.is_integer()),
    "number": lambda v: type(v) in (int, float),
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
}


def compile_flat_object(schema: dict):
    """A function body -> bool that agrees with the schema, or None if the schema is not a flat
    object of simple properties (then only jsonschema can decide)."""
    if set(schema) - _FLAT_OBJECT_KEYS or schema.get("type") != "object" or schema.get("additionalProperties") is not False:
        return None
    checks = {}
    for name, spec in schema.get("properties", {}).items():
        if not isinstance(spec, dict) or set(spec) - _PROPERTY_KEYS:
            return None
        checks[name] = _compile_property(spec)
    required = tuple(schema.get("required", ()))

    def is_valid(body) -> bool:
        if type(body) is not dict:
            return False
        for name in required:
            if name not in body:
                return False
        for name, value in body.items():
            check = checks.get(name)
            if check is None or not check(value):
                return False
        return True

    return is_valid


def _compile_property(spec: dict):
    tests = []
    if "type" in spec:
        kinds = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        type_checks = tuple(_TYPE_CHECKS[kind] for kind in kinds)
        if len(type_checks) == 1:
            tests.append(type_checks[0])
        else:
            tests.append(lambda v: type_checks[0](v) or type_checks[1](v) or any(check(v) for check in type_checks[2:]))
    if "enum" in spec:
        # JSON equality: true is not 1, and 1 is 1.0.
        allowed = {(type(e) is bool, e) for e in spec["enum"]}
        tests.append(lambda v: (type(v) is bool, v) in allowed if v is None or type(v) in (str, int, float, bool) else False)
    if "minimum" in spec:
        tests.append(lambda v, m=spec["minimum"]: type(v) not in (int, float) or type(v) is bool or v >= m)
    if "maximum" in spec:
        tests.append(lambda v, m=spec["maximum"]: type(v) not in (int, float) or type(v) is bool or v <= m)
    if "minLength" in spec:
        tests.append(lambda v, m=spec["minLength"]: type(v) is not str or len(v) >= m)
    if "maxLength" in spec:
        tests.append(lambda v, m=spec["maxLength"]: type(v) is not str or len(v) <= m)
    if "pattern" in spec:
        pattern = ecma_regex(spec["pattern"])
        tests.append(lambda v: type(v) is not str or pattern.search(v) is not None)
    tests = tuple(tests)

    def check(value) -> bool:
        for test in tests:
            if not test(value):
                return False
        return True

    return check
