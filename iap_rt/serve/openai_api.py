"""The OpenAI-compatible images request: parsing, limits and the error shape.

``POST /v1/images/generations`` takes OpenAI's fields (``prompt``, ``n``, ``size`` "WxH",
``response_format`` ``b64_json``; ``model`` and ``user`` are accepted and ignored) and ours
(``negative_prompt``, ``seed``, ``steps``, ``guidance_scale``, ``scheduler``). :func:`parse`
reads a body's JSON into a :class:`~iap_rt.requests.PromptRequest`, has it resolved against
the model by :func:`iap_rt.requests.resolve` (the model's defaults and rules, the same as
``iap-rt generate``), applies the server's limits (:class:`Limits`) on top, and returns the
:class:`~iap_rt.requests.ResolvedRequest`, or raises :class:`ApiError`, which the gateway
answers in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass

from iap_rt.errors import IapRtError
from iap_rt.requests import PromptRequest, RequestError, ResolvedRequest, resolve

OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "user")
OUR_FIELDS = ("negative_prompt", "seed", "steps", "guidance_scale", "scheduler")
EDIT_FIELDS = ("image", "mask", "strength", "mask_blur")  # /v1/images/edits (multipart)


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape; ``headers`` go with it (``Retry-After``)."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, headers: dict | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None):
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, on top of the model's own rules."""

    max_body_bytes: int = 65536
    max_prompt_chars: int = 1000
    max_n: int = 10
    max_steps: int = 150
    max_pixels: int = 4 * 1024 * 1024  # height x width x n
    max_upload_bytes: int = 16 * 2**20  # /v1/images/edits: the multipart body


def _bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _int(body: dict, name: str, default):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"'{name}' must be an integer, got {json.dumps(v)}")
    return v


def _str(body: dict, name: str, default):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _bad(name, f"'{name}' must be a string, got {json.dumps(v)}")
    return v


# a request field (iap_rt.requests.RequestError.field) -> its name in this API
_PARAM_OF = {"height": "size", "width": "size", "guidance": "guidance_scale", "batch_size": "n",
             "image": "image", "mask": "mask", "strength": "strength", "mask_blur": "mask_blur"}  # fmt: skip


def parse(raw: bytes, limits: Limits, model) -> ResolvedRequest:
    """Parse one JSON request body (``/v1/images/generations``) and resolve it against
    ``model`` (a :class:`~iap_rt.modeldir.ModelDir`); the server's limits on top."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(None, f"the request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object", "invalid_json")
    return _parse_fields(body, limits, model, ())


def parse_edit(form, limits: Limits, model) -> ResolvedRequest:
    """Parse one multipart form (``/v1/images/edits``: OpenAI's ``image``, optional ``mask``
    whose fully transparent pixels mark the region to edit, else the image's own transparent
    pixels, else the whole image; plus our ``strength`` and ``mask_blur``); text fields are
    typed as JSON would type them, then checked like a generation."""
    from iap_rt.image_input import mask_from_alpha, open_image, resize, to_rgb

    body: dict = {}
    for key, value in form.multi_items():
        key = key.removesuffix("[]")  # the OpenAI client may send image[]
        if key in body:
            raise _bad(key, f"'{key}' was given more than once", "invalid_value")
        body[key] = value
    if "image" not in body or isinstance(body["image"], str):
        raise _bad("image", "'image' (a file) is required", "missing_required_parameter")
    files = {}
    for key in ("image", "mask"):
        if key in body:
            upload = body.pop(key)
            if isinstance(upload, str):
                raise _bad(key, f"'{key}' must be a file", "invalid_value")
            files[key] = upload.file.read()
    for key, value in list(body.items()):
        body[key] = _typed(key, value)
    try:
        img = open_image(files["image"], "image", limits.max_pixels)
        image = to_rgb(img)
        if "mask" in files:
            mimg = open_image(files["mask"], "mask", limits.max_pixels)
            mask = mask_from_alpha(mimg)
            if mask is None:
                raise _bad("mask", "the mask has no transparent pixels to mark the region to "
                           "edit (OpenAI's convention: fully transparent = edit)")  # fmt: skip
        else:
            mask = mask_from_alpha(img)
    except IapRtError as e:
        code = "too_many_pixels" if "pixels; at most" in e.message else "invalid_image"
        param = "mask" if "mask" in e.message.split(" ")[:3] else "image"
        raise _bad(param, e.message + (f" ({e.fix})" if e.fix else ""), code) from None
    if mask is not None and mask.shape != image.shape[:2]:
        raise _bad("mask", f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                   f"{image.shape[1]}x{image.shape[0]}; they must be the same size")  # fmt: skip
    size = body.get("size", "auto")
    if isinstance(size, str) and size != "auto":
        h, w = _size(size)
        if (h, w) != image.shape[:2]:
            image = resize(image, w, h)
            mask = None if mask is None else resize(mask, w, h)
    return _parse_fields(body, limits, model, ("strength", "mask_blur"), image, mask)


def _typed(key: str, value: str):
    """A multipart text field as the JSON value it stands for (numbers, or the string)."""
    if key in ("n", "seed", "steps", "mask_blur"):
        try:
            return int(value)
        except ValueError:
            return value  # _int names the field
    if key in ("guidance_scale", "strength"):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _parse_fields(body: dict, limits: Limits, model, extra: tuple, image=None, mask=None):
    """The checks and the resolve shared by generations and edits."""
    unknown = sorted(set(body) - set(OPENAI_FIELDS) - set(OUR_FIELDS) - set(extra))
    if unknown:
        raise _bad(
            unknown[0], f"unrecognized request argument(s): {', '.join(unknown)}; valid: "
            f"{', '.join(OPENAI_FIELDS + OUR_FIELDS)}", "unknown_parameter",
        )  # fmt: skip
    if "prompt" not in body:
        raise _bad("prompt", "'prompt' is required", "missing_required_parameter")
    prompt = _str(body, "prompt", "")
    if not prompt.strip():
        raise _bad("prompt", "'prompt' must not be empty")
    if len(prompt) > limits.max_prompt_chars:
        raise _bad("prompt", f"'prompt' has {len(prompt)} characters; this server allows "
                   f"{limits.max_prompt_chars}", "prompt_too_long")  # fmt: skip
    negative = _str(body, "negative_prompt", "")
    if len(negative) > limits.max_prompt_chars:
        raise _bad("negative_prompt", f"'negative_prompt' has {len(negative)} characters; "
                   f"this server allows {limits.max_prompt_chars}", "prompt_too_long")  # fmt: skip
    n = _int(body, "n", 1)
    if not 1 <= n <= limits.max_n:
        raise _bad("n", f"'n' must be from 1 to {limits.max_n}, got {n}")
    fmt = _str(body, "response_format", "b64_json")
    if fmt != "b64_json":
        raise _bad("response_format", f"response_format {fmt!r} is not supported: this server "
                   "returns images inline only; use 'b64_json'", "unsupported_value")  # fmt: skip
    _str(body, "model", None), _str(body, "user", None)  # accepted, ignored (one model)
    steps = _int(body, "steps", None)
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise _bad("steps", f"'steps' must be from 1 to {limits.max_steps} on this server, "
                   f"got {steps}")  # fmt: skip
    guidance = body.get("guidance_scale")
    if guidance is not None and (
        isinstance(guidance, bool)
        or not isinstance(guidance, (int, float))
        or not math.isfinite(guidance)  # Python's json reads NaN and Infinity
    ):
        raise _bad(
            "guidance_scale", f"'guidance_scale' must be a number, got {json.dumps(guidance)}"
        )
    seed = _int(body, "seed", None)
    if seed is None:
        seed = secrets.randbelow(2**31)
    height, width = _size(_str(body, "size", "auto"))
    if image is not None:  # an edit: the image's size (resized to `size` above)
        height, width = image.shape[:2]
    strength = body.get("strength")
    if strength is not None and (isinstance(strength, bool) or
                                 not isinstance(strength, (int, float))):  # fmt: skip
        raise _bad("strength", f"'strength' must be a number, got {json.dumps(strength)}")
    blur = _int(body, "mask_blur", None)
    request = PromptRequest(prompt, negative, seed, guidance, n, None, steps, height, width,
                            _str(body, "scheduler", "") or None, image, mask, strength, blur)  # fmt: skip
    try:
        resolved = resolve(model, request)
    except RequestError as e:
        param = _PARAM_OF.get(e.field, e.field)
        raise _bad(param, e.message + (f" ({e.fix})" if e.fix else "")) from None
    if resolved.steps > limits.max_steps:
        raise _bad("steps", f"'steps' must be from 1 to {limits.max_steps} on this server, "
                   f"got {resolved.steps} (the model's default)")  # fmt: skip
    pixels = resolved.height * resolved.width * n
    if pixels > limits.max_pixels:
        raise _bad("size", f"{n} image(s) of {resolved.width}x{resolved.height} are {pixels} "
                   f"pixels; this server allows {limits.max_pixels} per request",
                   "too_many_pixels")  # fmt: skip
    return resolved


def _size(size: str) -> tuple[int | None, int | None]:
    """``"WxH"`` -> (height, width); ``"auto"`` -> (None, None): the model's size."""
    if size == "auto":
        return None, None
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*", size)
    if not m:
        raise _bad("size", f"'size' must be \"WIDTHxHEIGHT\" (e.g. \"512x512\") or \"auto\", "
                   f"got {size!r}")  # fmt: skip
    width, height = int(m.group(1)), int(m.group(2))
    if not width or not height:
        raise _bad("size", f"'size' must be positive, got {size!r}")
    return height, width
