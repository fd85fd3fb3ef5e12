"""The two validation layers: the body against the JSON Schema, then the model's capabilities."""

from __future__ import annotations

from aiohttp import web

from . import schemafiles, untrusted_json
from .catalog import NEVER_DROPPED, OPTIONAL_PARAMETERS, Capabilities, UploadLimits
from .errors import GatewayError, invalid_request
from .messages import ImageRequest
from .routing import Route
from .uploads import Form

_REQUEST_SCHEMA = schemafiles.load("image-generation-request.schema.json")
_REQUEST_VALIDATOR = schemafiles.validator(_REQUEST_SCHEMA)
_REQUEST_IS_VALID = schemafiles.compile_flat_object(_REQUEST_SCHEMA)
# The text fields of an edit's or a variation's form, once typed (imgproxy.uploads.typed_fields).
_FORM_VALIDATORS = {
    operation: schemafiles.validator(schemafiles.load(f"image-{operation}-request.schema.json")) for operation in ("edit", "variation")
}
# What each operation is called in messages.
OPERATION_NAMES = {"generate": "image generation", "edit": "image edits", "variation": "image variations"}
MASK_MAX_BYTES = 4 * 1024 * 1024
_DEFAULTED = frozenset({"quality", "style"})  # filled in from the model when not given  # OpenAI: "a valid PNG file, less than 4MB"


async def read_json_body(http: web.Request, max_bytes: int) -> dict:
    """The request body as a JSON object, or a clear 400/413/415."""
    if http.content_type != "application/json":
        raise GatewayError(
            415,
            f"Expected a JSON body with Content-Type: application/json, got '{http.content_type or 'none'}'.",
            code="unsupported_media_type",
        )
    if http.content_length is not None and http.content_length > max_bytes:
        raise _too_large(max_bytes)
    try:
        if http.content_length is not None and "Content-Encoding" not in http.headers:
            raw = await http.read()  # the app's own limit (MAX_BODY_CEILING) is far above any config
        else:  # chunked, or compressed (a small gzip can inflate to a gigabyte): count as it arrives
            raw = bytearray()
            async for chunk in http.content.iter_any():
                raw += chunk
                if len(raw) > max_bytes:
                    raise _too_large(max_bytes)
    except web.RequestPayloadError:  # bad gzip/deflate data, or chunks that break off
        encoding = http.headers.get("Content-Encoding", "none")
        raise invalid_request(
            f"The request body could not be decoded as sent (Content-Encoding: {encoding}).", code="invalid_content_encoding"
        ) from None
    try:
        body = untrusted_json.loads(raw, text_only=True)
    except untrusted_json.UntrustedJsonError as exc:
        raise invalid_request(f"The request body is JSON this gateway does not accept: {exc}.", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid_request(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.", code="invalid_json")
    return body


def _too_large(max_bytes: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than the {max_bytes} bytes this gateway accepts.", code="request_too_large")


def check_schema(body: dict, operation: str = "generate") -> None:
    if operation == "generate" and _REQUEST_IS_VALID is not None and _REQUEST_IS_VALID(body):
        return
    problem = schemafiles.first_error(_FORM_VALIDATORS.get(operation, _REQUEST_VALIDATOR), body)
    if problem is None:
        return
    path, message = problem
    param = str(path[0]) if path else None
    if message == "unknown key":
        raise invalid_request(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if message == "is required":
        raise invalid_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    raise invalid_request(f"Invalid '{param}': {message}.", param=param, code="invalid_value")


def check_capabilities(body: dict, route: Route, operation: str = "generate", form: Form | None = None) -> ImageRequest:
    """Refuse what the model cannot do; fill in its defaults. With the model's
    `unsupported_parameters: drop`, a parameter it does not take at all is left out of the
    upstream call and named in `ImageRequest.dropped` (the x-imgproxy-dropped-params header)
    instead; a value out of a parameter's range is still refused: dropping it would change what
    is made and what it costs without a word."""
    model = route.model.name
    caps = route.model.capabilities
    given = {k: v for k, v in body.items() if v is not None}
    dropped: list[str] | None = [] if route.model.unsupported_parameters == "drop" else None
    if form is not None:
        check_uploads(form, model, operation, caps)

    if len(given.get("prompt", "")) > caps.max_prompt_length:
        raise invalid_request(
            f"Invalid 'prompt': {model} takes at most {caps.max_prompt_length} characters, got {len(given['prompt'])}.",
            param="prompt",
            code="string_above_max_length",
        )
    n = int(given.get("n", 1))  # JSON's 2.0 is the integer 2
    if n > caps.max_n:
        allowed = "must be 1" if caps.max_n == 1 else f"must be between 1 and {caps.max_n}"
        raise invalid_request(f"Invalid n for {model}: {allowed}.", param="n", code="invalid_n")

    size = given.get("size", caps.default_size)
    _check_size(size, model, caps)
    quality = _choose(given, "quality", caps.qualities, caps.default_quality, model, dropped)
    style = _choose(given, "style", caps.styles, caps.default_style, model, dropped)

    options = {}
    for name in OPTIONAL_PARAMETERS:
        if name in given:
            if name not in caps.parameters:
                if dropped is not None and name not in NEVER_DROPPED:
                    dropped.append(name)
                    continue
                raise invalid_request(f"'{name}' is not supported by {model}.", param=name, code="unsupported_parameter")
            options[name] = given[name]
    response_format = given.get("response_format", caps.default_response_format)
    if options.get("stream") and response_format == "url":
        raise invalid_request(
            "stream=true returns base64 images as server-sent events; response_format 'url' cannot be streamed.",
            param="response_format",
            code="invalid_value",
        )
    if options.get("stream") and n > caps.n_per_call:
        raise invalid_request(
            f"stream=true takes n up to {caps.n_per_call} on {model}: more images are made by separate upstream "
            "calls, whose events cannot be streamed as one answer.",
            param="n",
            code="invalid_n",
        )
    return ImageRequest(
        prompt=given.get("prompt", ""),  # a variation has none
        model=model,
        n=n,
        size=size,
        response_format=response_format,
        moderation=given.get("moderation", "auto"),
        quality=quality,
        style=style,
        user=given.get("user"),
        options=options,
        operation=operation,
        form=form,
        dropped=tuple(dropped or ()),
        given=frozenset(given.keys() & _DEFAULTED),
    )


def check_uploads(form: Form, model: str, operation: str, caps: Capabilities) -> None:
    """The input images against what the model takes for this operation (its `edits:` or
    `variations:` capabilities): count, kind, size, squareness, and the mask's fit."""
    limits: UploadLimits | None = caps.edits if operation == "edit" else caps.variations
    if limits is None:
        raise invalid_request(f"The model '{model}' does not support {OPERATION_NAMES[operation]}.", param="model", code="unsupported_operation")
    if not form.images:
        raise invalid_request("Missing required parameter: 'image' (a file upload).", param="image", code="missing_required_parameter")
    if len(form.images) > limits.max_images:
        allowed = "one image" if limits.max_images == 1 else f"at most {limits.max_images} images"
        raise invalid_request(f"Invalid 'image': {model} takes {allowed}, got {len(form.images)}.", param="image", code="too_many_images")
    for upload in form.images:
        if upload.kind not in limits.image_types:
            raise invalid_request(
                f"Invalid 'image': {model} takes {_or_list(tuple(t.upper() for t in limits.image_types))} images, got {upload.kind.upper()}.",
                param="image", code="invalid_image_format",
            )
        if upload.size > limits.max_image_bytes:
            raise invalid_request(
                f"Invalid 'image': {model} takes images of at most {limits.max_image_bytes} bytes, got {upload.size}.",
                param="image", code="image_too_large",
            )
        if limits.square and upload.width is not None and upload.width != upload.height:
            raise invalid_request(
                f"Invalid 'image': {model} takes square images, got {upload.width}x{upload.height}.", param="image", code="invalid_image_dimensions"
            )
    total = sum(upload.size for upload in form.images)
    if limits.max_total_bytes is not None and total > limits.max_total_bytes:
        raise invalid_request(
            f"Invalid 'image': {model} takes input images of at most {limits.max_total_bytes} bytes together, got {total}.",
            param="image", code="image_too_large",
        )
    mask, first = form.mask, form.images[0]
    if mask is None:
        return
    if not limits.mask:
        raise invalid_request(f"'mask' is not supported by {model} for {OPERATION_NAMES[operation]}.", param="mask", code="unsupported_parameter")
    if mask.kind != "png":
        raise invalid_request(f"Invalid 'mask': it must be a PNG image, got {mask.kind.upper()}.", param="mask", code="invalid_image_format")
    if mask.size > MASK_MAX_BYTES:
        raise invalid_request(f"Invalid 'mask': at most {MASK_MAX_BYTES} bytes, got {mask.size}.", param="mask", code="image_too_large")
    if first.width is not None and (mask.width, mask.height) != (first.width, first.height):
        raise invalid_request(
            f"Invalid 'mask': it must have the dimensions of the first image ({first.width}x{first.height}), got {mask.width}x{mask.height}.",
            param="mask", code="invalid_image_dimensions",
        )


def _check_size(size: str, model: str, caps: Capabilities) -> None:
    if caps.allows_size(size):
        return
    allowed = _or_list(caps.sizes)
    if caps.custom_sizes:
        allowed += f", or {caps.custom_sizes.describe()}"
    raise invalid_request(f"Invalid size for {model}: must be {allowed}", param="size", code="invalid_size")


def _choose(given: dict, param: str, allowed: tuple[str, ...], default: str | None, model: str, dropped: list | None) -> str | None:
    if param not in given:
        return default
    value = given[param]
    if not allowed:
        if dropped is not None:  # the model takes no such parameter at all
            dropped.append(param)
            return default
        raise invalid_request(f"'{param}' is not supported by {model}.", param=param, code="unsupported_parameter")
    if value not in allowed:
        raise invalid_request(
            f"Invalid {param} for {model}: must be {_or_list(allowed)}", param=param, code=f"invalid_{param}"
        )
    return value


def _or_list(values: tuple[str, ...]) -> str:
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return f"{values[0]} or {values[1]}"
    return ", ".join(values[:-1]) + f", or {values[-1]}"
