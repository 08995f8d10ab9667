"""The ``iap-rt serve`` process tree: Triton (PyTriton) + the gateway (uvicorn), and shutdown.

One process runs the Triton model's Python callable (PyTriton starts ``tritonserver`` and its
Python-backend stub as children) and the FastAPI gateway on uvicorn. Modes: both (default);
``--triton-url`` the gateway alone against remote Triton servers; ``--no-gateway`` Triton alone.
SIGTERM or SIGINT: the gateway stops accepting connections, answers the requests in flight,
then Triton stops (it too finishes what is in flight) and the process exits 0. If the local
Triton dies, the gateway stops and the process exits 1, so a supervisor restarts it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import click

from iap_rt.config import ServeConfig
from iap_rt.errors import ConfigError

LOG = logging.getLogger("iap_rt.serve")


def check_config(cfg: ServeConfig) -> None:
    """Reject settings that cannot work, naming the option and the fix."""
    positive = ("max_batch", "instances", "max_queue", "max_body_bytes", "max_upload_bytes",
                "max_prompt_chars",
                "max_steps", "max_pixels")  # fmt: skip
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    from iap_rt.backends import BACKENDS

    if cfg.backend not in BACKENDS:
        raise ConfigError(
            f"unknown backend {cfg.backend!r}", fix=f"use one of {', '.join(BACKENDS)}."
        )
    if not 1 <= cfg.max_n <= 10:
        raise ConfigError(f"--max-n must be from 1 to 10 (OpenAI's range), got {cfg.max_n}")
    if cfg.timeout_s <= 0 or cfg.max_queue_delay_ms < 0:
        raise ConfigError("--timeout-s must be > 0 and --max-queue-delay-ms >= 0")
    for name in ("port", "triton_http_port", "triton_grpc_port", "triton_metrics_port"):
        if not 1 <= getattr(cfg, name) <= 65535:
            raise ConfigError(f"--{name.replace('_', '-')} must be a port 1-65535")
    if cfg.no_gateway and cfg.triton_url:
        raise ConfigError(
            "--no-gateway runs Triton alone and --triton-url runs the gateway alone",
            fix="pass one of them (or neither, for both in one process tree).",
        )
    for url in cfg.triton_url:
        host, _, port = url.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--triton-url {url!r} is not HOST:PORT", fix="e.g. gpu1:8002")


def read_api_key(path: str | None) -> str | None:
    """The key in ``path`` (first line, stripped), or None without a file."""
    if path is None:
        return None
    p = Path(path)
    try:
        key = p.read_text("utf-8").strip().splitlines()[0].strip() if p.stat().st_size else ""
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the API key file {p}: {e}",
                          fix="pass --api-key-file FILE holding the key on its first line.") from None  # fmt: skip
    if not key:
        raise ConfigError(f"the API key file {p} is empty", fix="write the key on its first line.")
    return key


def triton_settings(cfg: ServeConfig):
    from iap_rt.serve.triton import TritonSettings

    return TritonSettings(
        model=cfg.model, backend=cfg.backend, host=cfg.host, http_port=cfg.triton_http_port,
        grpc_port=cfg.triton_grpc_port, metrics_port=cfg.triton_metrics_port,
        max_batch=cfg.max_batch, max_queue_delay_ms=cfg.max_queue_delay_ms,
        instances=cfg.instances, max_queue=cfg.max_queue, timeout_s=cfg.timeout_s,
    )  # fmt: skip


class _Stop:
    """SIGTERM/SIGINT -> a flag (uvicorn re-raises the signal it caught after its shutdown)."""

    def __init__(self):
        self.event = threading.Event()
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, sig, frame) -> None:
        self.signal = sig
        self.event.set()


def serve(cfg: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT; return the exit code (0: a clean stop)."""
    from iap_rt.extras import require

    require("serve", "serve")
    check_config(cfg)
    api_key = read_api_key(cfg.api_key_file)
    stop = _Stop()
    triton = None
    if not cfg.triton_url:
        from iap_rt.serve.triton import check_port_free, start_triton

        if not cfg.no_gateway:
            check_port_free(cfg.host, cfg.port, "--port")
        triton = start_triton(triton_settings(cfg))
    try:
        if cfg.no_gateway:
            click.echo(f"iap-rt serve: Triton on {cfg.host} (HTTP {cfg.triton_http_port}, gRPC "
                       f"{cfg.triton_grpc_port}, metrics {cfg.triton_metrics_port})")  # fmt: skip
            while not stop.event.wait(1.0):
                if not triton.is_alive():
                    LOG.error("Triton stopped unexpectedly")
                    return 1
            return 0
        return _run_gateway(cfg, api_key, triton, stop)
    finally:
        if triton is not None:
            triton.stop()


def _run_gateway(cfg: ServeConfig, api_key: str | None, triton, stop: _Stop) -> int:
    import uvicorn

    from iap_rt.modeldir import ModelDir, default_model_dir
    from iap_rt.serve.gateway import GatewaySettings, create_app
    from iap_rt.serve.openai_api import Limits
    from iap_rt.serve.upstream import TritonPool

    # requests are resolved against the model's light files (manifest, scheduler config);
    # its networks are neither checked nor loaded here
    model = ModelDir.open(cfg.model or default_model_dir(), networks=())
    local = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    urls = list(cfg.triton_url) or [f"{local}:{cfg.triton_grpc_port}"]
    limits = Limits(cfg.max_body_bytes, cfg.max_prompt_chars, cfg.max_n, cfg.max_steps,
                    cfg.max_pixels, cfg.max_upload_bytes)  # fmt: skip
    settings = GatewaySettings(limits, cfg.max_queue, cfg.timeout_s, api_key)
    app = create_app(settings, TritonPool(urls), model)
    verbose = logging.getLogger().level <= logging.INFO
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level="info" if verbose else "warning",
        access_log=verbose, timeout_graceful_shutdown=int(cfg.timeout_s) + 5,
    ))  # fmt: skip
    failed = threading.Event()
    if stop.event.is_set():  # stopped while Triton was starting
        return 0
    if triton is not None:
        threading.Thread(target=_watch, args=(triton, server, failed, stop), daemon=True).start()
    click.echo(f"iap-rt serve: http://{cfg.host}:{cfg.port}/ (web page), API "
               f"/v1/images/generations, Triton gRPC {', '.join(urls)}", err=True)  # fmt: skip
    server.run()
    if stop.signal is not None:
        LOG.info("stopped by signal %d after answering the requests in flight", stop.signal)
    return 1 if failed.is_set() else 0


def _watch(triton, server, failed: threading.Event, stop: _Stop) -> None:
    """Stop the gateway (exit 1) when the local Triton dies."""
    while not server.should_exit and not stop.event.is_set():
        time.sleep(1.0)
        if not triton.is_alive() and not stop.event.is_set():
            LOG.error("Triton stopped unexpectedly; stopping the gateway")
            failed.set()
            server.should_exit = True
            return
