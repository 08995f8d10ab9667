"""Helpers of the serving tests: a real ``iap-rt serve`` process on free ports, a JSON client,
and reference images from the in-process pipeline (what ``iap-rt generate`` computes)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="the [serve] extra is not installed")

from iap_rt.serve.triton import free_ports  # noqa: E402

START_TIMEOUT_S = 300  # Triton + model load; a loaded 2-core CI machine is slow


@dataclass
class Server:
    """A running ``iap-rt serve`` child process."""

    proc: subprocess.Popen
    url: str
    grpc_port: int
    log: Path
    ports: tuple[int, int, int, int]

    def tritonserver_pid(self) -> int:
        """The pid of the ``tritonserver`` this ``iap-rt serve`` started."""
        from iap_rt.bench.machine import find_process

        pid = find_process(self.proc.pid, "tritonserver")
        assert pid is not None, f"no tritonserver under pid {self.proc.pid}"
        return pid

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text("utf-8", "replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"iap-rt serve ignored SIGTERM\n{self.log_tail()}") from None


def start_server(log_dir: Path, *args: str, env: dict | None = None, ready: str = "/readyz",
                 name: str = "serve", top: tuple[str, ...] = (),
                 ports: tuple[int, int, int, int] | None = None) -> Server:  # fmt: skip
    """Start ``iap-rt *top serve *args`` on ``ports`` (gateway, Triton HTTP, gRPC, metrics;
    default: free ones); wait until ``ready`` answers 200 (None: Triton's gRPC port opens)."""
    port, http, grpc, metrics = ports or free_ports(4)
    log = log_dir / f"{name}-{port}.log"
    cmd = [sys.executable, "-m", "iap_rt.cli", *top, "serve", "--port", str(port),
           "--triton-http-port", str(http), "--triton-grpc-port", str(grpc),
           "--triton-metrics-port", str(metrics), *args]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=log_dir,
                                env={**os.environ, **(env or {})})  # fmt: skip
    server = Server(proc, f"http://127.0.0.1:{port}", grpc, log, (port, http, grpc, metrics))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"iap-rt serve exited {proc.returncode}\n{server.log_tail()}")
        if ready is None:
            if _grpc_open(grpc):
                return server
        elif call(server.url, "GET", ready, timeout=5)[0] == 200:
            return server
        time.sleep(1.0)
    server.stop()
    raise AssertionError(f"iap-rt serve not ready in {START_TIMEOUT_S} s\n{server.log_tail()}")


def _grpc_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2):
        return True
    return False


def call(url: str, method: str, path: str, body=None, headers: dict | None = None,
         timeout: float = 300) -> tuple[int, dict | str, dict]:  # fmt: skip
    """(status, parsed JSON or text, headers); never raises for an HTTP status."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body, ensure_ascii=False).encode("utf-8")
    req = urllib.request.Request(url + path, data=body, method=method, headers=headers or {})
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, hdrs = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), dict(e.headers)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, "", {}
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text), hdrs
    except json.JSONDecodeError:
        return status, text, hdrs


def pngs(doc: dict) -> list[bytes]:
    return [base64.b64decode(item["b64_json"]) for item in doc["data"]]


@pytest.fixture(scope="session")
def reference():
    """``reference(prompt, seed=, steps=, guidance=, negative=, size=, scheduler=)`` -> the PNG
    bytes ``iap-rt generate`` writes for it (the in-process pipeline on the embedded model;
    guidance None: the model's default, as a request without ``guidance_scale`` gets)."""
    from iap_rt.images import png_bytes
    from iap_rt.pipeline import Pipeline

    pipe = Pipeline.from_dir(progress=False)

    def ref(prompt, seed=0, steps=25, guidance=None, negative="", size=None, scheduler=None):
        size = size or pipe.model.default_size
        r = pipe(prompt, negative, steps=steps, guidance=guidance, seed=seed, height=size,
                 width=size, scheduler=scheduler)  # fmt: skip
        return png_bytes(r.images[0], dict(r.params, seed=seed))

    return ref
