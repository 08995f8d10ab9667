"""``iap-rt generate --server URL``: generate through a running ``iap-rt serve`` (stdlib only).

The same flags as a local ``generate``; the server's PNGs (with the iap-rt parameters chunk)
are written byte for byte, so a seed gives the same file locally and through the server. A
batch larger than the server's per-request limit is split into requests whose seeds continue
(image i still uses seed + i); several prompts go out concurrently so the server can batch them.
The API key, if the server needs one, comes from ``$IAP_RT_API_KEY``.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

from iap_rt.errors import InputError, ServerError

KEY_ENV = "IAP_RT_API_KEY"
MAX_N = 10  # OpenAI's per-request limit (a server may allow fewer: its 400 says so)
CONCURRENCY = 4


class Client:
    """A small client of the gateway's JSON API."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--server {url!r} is not an http(s) URL",
                             fix="e.g. --server http://127.0.0.1:8000")  # fmt: skip
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(KEY_ENV) or None
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict | None = None, files=None) -> dict:
        if files:  # multipart/form-data: the edits endpoint
            boundary = uuid.uuid4().hex
            data, kind = (
                _multipart(body or {}, files, boundary),
                f"multipart/form-data; boundary={boundary}",
            )
        else:
            data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
            kind = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", kind)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise _server_error(e.code, e.read()) from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(
                f"cannot reach the server {self.url}: {getattr(e, 'reason', e)}",
                fix="start it with `iap-rt serve` or pass the right --server URL.",
            ) from None

    def info(self) -> dict:
        """The server's model and limits (``GET /info``)."""
        return self._call("GET", "/info")

    def models(self) -> list[dict]:
        """``GET /v1/models`` (needs the API key where the server has one)."""
        return self._call("GET", "/v1/models")["data"]

    def images(self, files=None, **body) -> dict:
        """``POST /v1/images/generations``, or with ``files`` (``image``, ``mask``: PNG
        bytes) ``POST /v1/images/edits``; the response (``data``, and ``warning`` where the
        model has a word on the prompt)."""
        if files:
            return self._call("POST", "/v1/images/edits", body, files)
        return self._call("POST", "/v1/images/generations", body)


def _multipart(fields: dict, files: dict, boundary: str) -> bytes:
    """A multipart/form-data body: text ``fields`` and PNG ``files`` (name -> bytes)."""
    out = []
    for name, value in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                   f"{value}\r\n".encode())  # fmt: skip
    for name, data in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                   f'filename="{name}.png"\r\nContent-Type: image/png\r\n\r\n'.encode())  # fmt: skip
        out.append(data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def edit_files(image, mask) -> dict:
    """The edits endpoint's uploads from arrays: the image as PNG, the mask (white = repaint)
    as OpenAI's convention, an RGBA PNG fully transparent where the image is to be edited."""
    import io

    import numpy as np
    from PIL import Image

    def png(array, mode=None) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array, mode).save(buf, format="PNG")
        return buf.getvalue()

    files = {"image": png(image)}
    if mask is not None:
        rgba = np.zeros((*mask.shape, 4), np.uint8)
        rgba[..., 3] = np.where(mask >= 128, 0, 255)
        files["mask"] = png(rgba, "RGBA")
    return files


def _server_error(status: int, raw: bytes) -> ServerError | InputError:
    try:
        err = json.loads(raw.decode("utf-8"))["error"]
        message = err["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace")[:300]
    if status == 401:
        return ServerError(f"the server refused the API key (401): {message}",
                           fix=f"set {KEY_ENV} to the server's key.")  # fmt: skip
    if 400 <= status < 500 and status != 429:
        return InputError(f"the server rejected the request ({status}): {message}")
    return ServerError(f"the server answered {status}: {message}",
                       fix="retry later, or check the server's log.")  # fmt: skip


def generate_remote(url: str, prompts: list[str], cfg, as_json: bool, echo, warn,
                    image=None, mask=None) -> None:  # fmt: skip
    """Generate ``cfg.batch_size`` images per prompt on the server and write them to the paths
    ``cfg.out`` plans, as ``iap-rt generate`` would (``warn``: the model's notices); with
    ``image`` (and ``mask``) through the edits endpoint."""
    from iap_rt.images import plan_outputs, save_png_bytes

    client = Client(url)
    client.models()  # a refused key fails here, before any file is planned
    size = "auto"  # the server's model decides what is left unset (iap_rt.requests)
    files = edit_files(image, mask) if image is not None else None
    if files is None and (cfg.height is not None or cfg.width is not None):
        d = client.info()["defaults"]
        size = f"{cfg.width or d['width']}x{cfg.height or d['height']}"
    jobs = []  # (prompt, seed, n) in output order
    for p in prompts:
        for first in range(0, cfg.batch_size, MAX_N):
            jobs.append((p, cfg.seed + first, min(MAX_N, cfg.batch_size - first)))
    paths = iter(plan_outputs(cfg.out, len(prompts) * cfg.batch_size))

    def run(job):
        prompt, seed, n = job
        body = dict(prompt=prompt, negative_prompt=cfg.negative, n=n, seed=seed, size=size)
        for key, value in (("steps", cfg.steps), ("guidance_scale", cfg.guidance),
                           ("scheduler", cfg.scheduler), ("strength", cfg.strength),
                           ("mask_blur", cfg.mask_blur)):  # fmt: skip
            if value is not None and (files or key not in ("strength", "mask_blur")):
                body[key] = value  # else the server's model default
        return client.images(files=files, **body)

    warned = set()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for answer in pool.map(run, jobs):
            if answer.get("warning") and answer["warning"] not in warned:
                warned.add(answer["warning"])
                warn(answer["warning"])
            for item in answer["data"]:
                path = save_png_bytes(next(paths), base64.b64decode(item["b64_json"]))
                if as_json:
                    echo(json.dumps({"path": str(path), **item["parameters"]}, ensure_ascii=False))
                else:
                    echo(f"wrote {path}")
