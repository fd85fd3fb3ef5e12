"""Loading the JSON Schema files shipped in `schemas/`, and turning their errors into words."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

import jsonschema
from jsonschema import Draft202012Validator


@cache
def load(name: str) -> dict:
    return json.loads(resources.files("imgproxy.schemas").joinpath(name).read_text("utf-8"))


def validator(schema: dict) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


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
    if error.validator == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        return f"must be of type {wanted}, not {_json_type(error.instance)}"
    if error.validator == "oneOf" and all(set(branch) == {"required"} for branch in error.validator_value):
        names = [name for branch in error.validator_value for name in branch["required"]]
        return "needs exactly one of: " + ", ".join(names)
    if error.validator == "enum":
        return "must be one of " + ", ".join(json.dumps(v) for v in error.validator_value)
    return error.message


def _json_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), "null"
    )


def dotted(path: list) -> str:
    return ".".join(str(p) for p in path) or "(top level)"
