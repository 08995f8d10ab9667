"""The HTTP gateway (FastAPI) in front of Triton.

Routes: ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (multipart; OpenAI-
compatible, see ``openai_api.py``), ``GET /v1/models``,
``GET /healthz`` (the process is alive), ``GET /readyz`` (a Triton in rotation has the model
loaded; each upstream's state and the retries), ``GET /metrics`` (Prometheus text, the
upstreams' states and retries included), ``GET /info`` (model and limits, for the web page) and
``GET /`` (the web page, served from ``web/``: no external assets). Every error is answered in
OpenAI's shape, FastAPI's own 404/405/422 included. An image request is admitted only while
fewer than ``max_queue`` images wait (else 429 with ``Retry-After``), runs as one Triton row per
image, and is answered 504 past ``timeout_s``. With an API key, ``/v1/*`` needs
``Authorization: Bearer KEY`` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from iap_rt.images import png_bytes
from iap_rt.requests import model_defaults
from iap_rt.serve.metrics import Metrics
from iap_rt.serve.openai_api import ApiError, Limits, parse, parse_edit
from iap_rt.serve.protocol import Row
from iap_rt.serve.upstream import TritonPool, UpstreamError

LOG = logging.getLogger("iap_rt.serve")
WEB_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


@dataclass(frozen=True)
class GatewaySettings:
    """The gateway's limits and access."""

    limits: Limits = field(default_factory=Limits)
    max_queue: int = 64  # images admitted (waiting + generating) before 429
    timeout_s: float = 300.0  # per request, then 504
    api_key: str | None = None


class _State:
    """Mutable per-app state: queue accounting and the latency estimate for Retry-After."""

    def __init__(self):
        self.queue_images = 0
        self.latency_s = 1.0  # moving average of answered requests
        self.draining = False


def create_app(settings: GatewaySettings, pool: TritonPool, model):
    """The FastAPI app; requests are resolved against ``model`` (a
    :class:`~iap_rt.modeldir.ModelDir`, networks not needed) before they queue, and Triton
    trusts the rows resolved here."""
    metrics, state = Metrics(), _State()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await pool.start()
        try:
            yield
        finally:
            state.draining = True
            await pool.close()

    app = FastAPI(title="iap-rt", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.metrics = metrics

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(ApiError(e.status_code, str(e.detail), kind, code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error_response(ApiError(400, f"invalid request: {first.get('msg', e)}", param=param))

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.request(getattr(route, "path", "other"), response.status_code)
        return response

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            key.strip().encode(), settings.api_key.encode()
        ):
            raise ApiError(
                401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    async def read_body(request: Request, cap: int | None = None) -> bytes:
        cap = settings.limits.max_body_bytes if cap is None else cap
        too_big = ApiError(413, f"the request body is larger than {cap} bytes",
                           code="request_too_large")  # fmt: skip
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        servers = await pool.readiness()
        ready = any(servers.values()) and not state.draining
        doc = {"ready": ready, "triton": servers, "upstreams": pool.state(),
               "retries": pool.retries}  # fmt: skip
        headers = {} if ready else {"Retry-After": str(pool.retry_after_s())}
        return JSONResponse(doc, status_code=200 if ready else 503, headers=headers)

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth = state.queue_images
        text = metrics.render() + "\n".join(pool.metric_lines()) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/info")
    async def info():
        doc = {"auth_required": settings.api_key is not None,
               "limits": settings.limits.__dict__ | {"max_queue": settings.max_queue,
                                                     "timeout_s": settings.timeout_s}}  # fmt: skip
        d = model_defaults(model)
        doc |= {"model_id": model.model_id, "defaults": d, "default_size": d["height"],
                "size_multiple": d["size_multiple"], "schedulers": d["schedulers"],
                "default_scheduler": d["scheduler"], "default_guidance": d["guidance"]}  # fmt: skip
        return doc

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        name = model.model_id
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "iap-rt"}]}

    async def edit_job(request: Request):
        """A multipart edit, its whole body read within the upload cap before parsing."""
        body = await read_body(request, settings.limits.max_upload_bytes)
        kind = request.headers.get("content-type", "")
        if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise ApiError(400, "an edit is a multipart/form-data body (image, prompt, ...)",
                           code="invalid_request")  # fmt: skip
        request._body = body  # starlette's form parser reads the cached body
        try:
            form = await request.form(max_files=2, max_fields=32)
        except Exception as e:  # noqa: BLE001 - a malformed multipart body
            raise ApiError(400, f"the multipart body cannot be read: {e}",
                           code="invalid_request") from None  # fmt: skip
        try:
            return await run_in_threadpool(parse_edit, form, settings.limits, model)
        finally:
            await form.close()

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        return await images(request, edit=True)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        return await images(request, edit=False)

    async def images(request: Request, edit: bool):
        t0 = time.perf_counter()
        try:
            check_key(request)
            if edit:
                job = await edit_job(request)
            else:
                job = parse(await read_body(request), settings.limits, model)
            if state.queue_images + job.batch_size > settings.max_queue:
                retry = max(1, math.ceil(state.latency_s))
                raise ApiError(
                    429, f"the server is busy ({state.queue_images} images queued, at most "
                    f"{settings.max_queue}); retry after {retry} s", "rate_limit_error",
                    code="queue_full", headers={"Retry-After": str(retry)},
                )  # fmt: skip
            state.queue_images += job.batch_size
            metrics.in_flight += 1
            try:
                results = await _run_rows(pool, Row.of(job), settings.timeout_s)
            finally:
                state.queue_images -= job.batch_size
                metrics.in_flight -= 1
            data = await run_in_threadpool(_encode, results)
        except ApiError as e:
            return error_response(e)
        except UpstreamError as e:
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            kind = "rate_limit_error" if e.status == 429 else kind
            headers = (
                {"Retry-After": str(max(1, math.ceil(state.latency_s)))} if e.status == 429 else {}
            )
            if e.retry_after is not None:  # 503: no Triton ready; when one may be back
                headers = {"Retry-After": str(e.retry_after)}
            return error_response(ApiError(e.status, e.message, kind, code=e.code, headers=headers))
        except Exception as e:  # a bug: answer 500 and keep serving
            LOG.exception("request failed")
            return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                           "server_error", code="internal_error"))  # fmt: skip
        seconds = time.perf_counter() - t0
        state.latency_s = 0.8 * state.latency_s + 0.2 * seconds
        metrics.generated(seconds, [r.batch for r in results])
        answer = {"created": int(time.time()), "data": data}
        if job.notice:  # the model's word on a prompt outside what it knows
            answer["warning"] = job.notice
        return answer

    @app.get("/")
    async def index():
        return HTMLResponse(_web("index.html"))

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in WEB_FILES:
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return Response(_web(name), media_type=WEB_FILES[name])

    return app


async def _run_rows(pool: TritonPool, rows, timeout_s: float):
    """Every row of a request concurrently; the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(pool.infer(row, timeout_s)) for row in rows]
    try:
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise UpstreamError(504, "timeout", f"the request took longer than {timeout_s:g} s "
                            "(--timeout-s)") from None  # fmt: skip
    finally:
        for t in tasks:
            t.cancel()


def _encode(results) -> list[dict]:
    """PNG (with the iap-rt parameters chunk) -> base64, one item per image."""
    return [
        {"b64_json": base64.b64encode(png_bytes(r.image, r.params)).decode("ascii"),
         "seed": r.params["seed"], "parameters": r.params}
        for r in results
    ]  # fmt: skip


def _web(name: str) -> bytes:
    return (resources.files("iap_rt.serve") / "web" / name).read_bytes()
