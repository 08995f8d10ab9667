"""Starting Triton Inference Server with the model ``iap_rt`` through PyTriton.

:func:`start_triton` opens ``instances`` pipelines on the model directory (networks loaded up
front, so "ready" means ready), binds them as the instances of the Triton model ``iap_rt``
with a dynamic batcher (``max_batch`` rows, ``max_queue_delay_ms``; a queue policy that rejects
past ``max_queue`` queued rows or after ``timeout_s``), and starts ``tritonserver`` listening
on ``host`` (HTTP/gRPC, KServe v2, and Prometheus metrics). PyTriton's Python-backend stub
loads this interpreter's ``libpython`` at run time; :func:`libpython_env` puts its directory
on ``LD_LIBRARY_PATH`` so that works from any venv (pyenv and other self-built Pythons).
"""

from __future__ import annotations

import logging
import os
import socket
import sysconfig
from dataclasses import dataclass

import numpy as np

from iap_rt.errors import BackendUnavailableError, ConfigError
from iap_rt.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS

LOG = logging.getLogger("iap_rt.serve")


@dataclass(frozen=True)
class TritonSettings:
    """What :func:`start_triton` needs (from ``ServeConfig``)."""

    model: str | None = None
    backend: str = "auto"
    host: str = "127.0.0.1"
    http_port: int = 8001
    grpc_port: int = 8002
    metrics_port: int = 8003
    max_batch: int = 8
    max_queue_delay_ms: float = 10.0
    instances: int = 1
    max_queue: int = 64
    timeout_s: float = 300.0


def libpython_env() -> None:
    """Prepend this interpreter's ``LIBDIR`` (where ``libpython3.X.so`` lives) to
    ``LD_LIBRARY_PATH``, which Triton's Python-backend stub inherits."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not os.path.isdir(libdir):
        return
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir not in parts:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *parts])


def check_port_free(host: str, port: int, option: str) -> None:
    """Raise :class:`ConfigError` naming ``option`` when ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({option}): {e.strerror or e}",
                fix=f"pass another {option}, or stop what is using port {port}.",
            ) from None


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports on ``host`` that were free a moment ago (all bound at once, so no
    two are the same), for a server and its Triton HTTP/gRPC/metrics ports in tests and benches."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def load_pipelines(settings: TritonSettings) -> list:
    """``instances`` pipelines on the model, networks loaded (each instance its own)."""
    from iap_rt.backends import get_backend
    from iap_rt.modeldir import ModelDir, default_model_dir
    from iap_rt.pipeline import Pipeline

    pipes = []
    for _ in range(settings.instances):
        model = ModelDir.open(settings.model or default_model_dir())
        pipe = Pipeline(
            model, get_backend(settings.backend, model), progress=False,
            chunk_size=settings.max_batch,
        )  # fmt: skip
        pipe.runners  # noqa: B018 - load sessions/engines now: ready means ready
        pipes.append(pipe)
    return pipes


def start_triton(settings: TritonSettings):
    """Start ``tritonserver`` serving ``iap_rt``; return the running PyTriton ``Triton``."""
    from iap_rt.extras import require

    require("serve", "serve")
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
    from pytriton.triton import Triton, TritonConfig

    from iap_rt.serve.triton_model import FAULT_ENV, ImageModel

    for port, option in (
        (settings.http_port, "--triton-http-port"),
        (settings.grpc_port, "--triton-grpc-port"),
        (settings.metrics_port, "--triton-metrics-port"),
    ):
        check_port_free(settings.host, port, option)
    pipes = load_pipelines(settings)
    libpython_env()
    config = TritonConfig(
        http_address=settings.host, http_port=settings.http_port,
        grpc_address=settings.host, grpc_port=settings.grpc_port,
        metrics_address=settings.host, metrics_port=settings.metrics_port,
        allow_gpu_metrics=False, strict_readiness=True, exit_timeout_secs=30, log_verbose=0,
    )  # fmt: skip
    policy = QueuePolicy(
        default_timeout_microseconds=int(settings.timeout_s * 1e6),
        allow_timeout_override=True,
        max_queue_size=settings.max_queue,
    )
    batcher = DynamicBatcher(
        max_queue_delay_microseconds=int(settings.max_queue_delay_ms * 1000),
        default_queue_policy=policy,
    )
    triton = Triton(config=config)
    fault = os.environ.get(FAULT_ENV)
    try:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=[ImageModel(p, fault_prompt=fault) for p in pipes],
            inputs=[Tensor(name=k, dtype=bytes if d is np.object_ else d, shape=(1,))
                    for k, (d, _) in INPUTS.items()],
            outputs=[Tensor(name=k, dtype=bytes if d is np.object_ else d, shape=s)
                     for k, (d, _, s) in OUTPUTS.items()],
            config=ModelConfig(max_batch_size=settings.max_batch, batcher=batcher),
            strict=True,
        )  # fmt: skip
        triton.run()
    except Exception as e:
        triton.stop()
        raise BackendUnavailableError(
            f"Triton Inference Server did not start: {type(e).__name__}: {e}",
            fix="run with --debug -v for Triton's log; check the ports and the model directory.",
        ) from e
    LOG.info(
        "Triton: model %s on %s (HTTP %d, gRPC %d, metrics %d)", MODEL_NAME, settings.host,
        settings.http_port, settings.grpc_port, settings.metrics_port,
    )  # fmt: skip
    return triton
