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

from iap_rt.requests import PromptRequest, RequestError, ResolvedRequest, resolve

OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "user")
OUR_FIELDS = ("negative_prompt", "seed", "steps", "guidance_scale", "scheduler")


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
_PARAM_OF = {"height": "size", "width": "size", "guidance": "guidance_scale", "batch_size": "n"}


def parse(raw: bytes, limits: Limits, model) -> ResolvedRequest:
    """Parse one request body and resolve it against ``model`` (a
    :class:`~iap_rt.modeldir.ModelDir`); the server's limits on top."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(None, f"the request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object", "invalid_json")
    unknown = sorted(set(body) - set(OPENAI_FIELDS) - set(OUR_FIELDS))
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
    request = PromptRequest(prompt, negative, seed, guidance, n, None, steps, height, width,
                            _str(body, "scheduler", "") or None)  # fmt: skip
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
