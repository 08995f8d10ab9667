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

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
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

    def images(self, **body) -> dict:
        """``POST /v1/images/generations``; the response (``data``, and ``warning`` where the
        model has a word on the prompt)."""
        return self._call("POST", "/v1/images/generations", body)


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


def generate_remote(url: str, prompts: list[str], cfg, as_json: bool, echo, warn) -> None:
    """Generate ``cfg.batch_size`` images per prompt on the server and write them to the paths
    ``cfg.out`` plans, as ``iap-rt generate`` would (``warn``: the model's notices)."""
    from iap_rt.images import plan_outputs, save_png_bytes

    client = Client(url)
    client.models()  # a refused key fails here, before any file is planned
    size = "auto"  # the server's model decides what is left unset (iap_rt.requests)
    if cfg.height is not None or cfg.width is not None:
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
                           ("scheduler", cfg.scheduler)):  # fmt: skip
            if value is not None:  # else the server's model default
                body[key] = value
        return client.images(**body)

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
