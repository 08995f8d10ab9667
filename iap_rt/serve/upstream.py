"""The gateway's client of one or more Triton servers (async gRPC, KServe v2), health-aware.

:class:`TritonPool` sends one-row inferences of the model ``iap_rt`` (see ``protocol.py``) to
the *ready* server with the fewest rows in flight, and turns Triton's failures into
:class:`UpstreamError` with the HTTP status the gateway answers: a full queue 429, a request
past its deadline 504, no server reachable 503 (with ``Retry-After``), anything else 500.
Several ``--triton-url`` servers (one per GPU or node) are the scale-out.

Health: a server that refuses a connection, drops one, or fails or times out its readiness
probe is taken out of rotation at once; a background task probes every server (ready ones
every :attr:`~TritonPool.probe_interval_s`, the others with a backoff that doubles up to
:attr:`~TritonPool.max_backoff_s`) and puts it back when it answers ready.

Retries: a row whose server was unreachable (refused, reset, unavailable) is sent again to
another ready server, at most once per server. That is safe for *every* row, also one that may
have started generating on the server that died: every row carries its seed (the gateway draws
one when the client names none), so generating it again gives the very same image, byte for
byte. A row that Triton answered (an error of its own, a full queue, a deadline) is not
retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from iap_rt.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS, Row

LOG = logging.getLogger("iap_rt.serve")


@dataclass
class RowResult:
    """One generated image and the parameters its PNG records."""

    image: np.ndarray  # (H, W, 3) uint8
    params: dict
    batch: int  # images that shared its UNet batch


class UpstreamError(Exception):
    """A row that Triton did not generate: ``status`` is the HTTP status to answer;
    ``retry_after`` (seconds) goes with a 503 when no server is ready."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after


def classify(message: str) -> UpstreamError:
    """Map a Triton/gRPC failure message to the HTTP status it means."""
    m = message.lower()
    if "maximum queue size" in m:
        return UpstreamError(429, "queue_full", "the Triton queue is full")
    if "deadline" in m or "timeout" in m or "timed out" in m:
        return UpstreamError(504, "timeout", "the request took longer than the server allows")
    if any(w in m for w in ("unavailable", "connect", "not ready", "unknown model", "socket",
                            "reset", "broken pipe", "eof")):  # fmt: skip
        return UpstreamError(503, "triton_unavailable", f"Triton is not reachable: {message}")
    return UpstreamError(500, "triton_error", f"Triton failed: {message}")


@dataclass
class Upstream:
    """One Triton server and what the gateway knows of it."""

    url: str
    ready: bool = False
    in_flight: int = 0
    rows: int = 0  # rows it answered
    failures: int = 0  # times it was taken out of rotation
    down_since: float | None = None  # monotonic time it was taken out (None: in rotation)
    backoff_s: float = 0.0
    next_probe: float = 0.0
    last_error: str = ""
    client: object = field(default=None, repr=False)

    def state(self, now: float) -> dict:
        return {"ready": self.ready, "in_flight": self.in_flight, "rows": self.rows,
                "failures": self.failures, "last_error": self.last_error or None,
                "down_for_s": None if self.down_since is None else round(now - self.down_since, 3)}  # fmt: skip


class TritonPool:
    """Async gRPC clients of ``urls`` (``HOST:PORT`` of Triton gRPC endpoints), with health
    probes in the background and retries on another server."""

    def __init__(
        self, urls: list[str], probe_interval_s: float = 1.0, probe_timeout_s: float = 2.0,
        min_backoff_s: float = 0.25, max_backoff_s: float = 5.0,
    ):  # fmt: skip
        if not urls:
            raise ValueError("TritonPool needs at least one Triton gRPC URL")
        self.upstreams = {u: Upstream(u) for u in dict.fromkeys(urls)}
        self.probe_interval_s, self.probe_timeout_s = probe_interval_s, probe_timeout_s
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.retries = 0  # rows sent again to another server
        self._task: asyncio.Task | None = None

    @property
    def urls(self) -> list[str]:
        return list(self.upstreams)

    async def start(self) -> None:
        """Open the channels, probe every server once, start the background probes (inside
        the running event loop)."""
        import tritonclient.grpc.aio as grpcclient

        for up in self.upstreams.values():
            up.client = grpcclient.InferenceServerClient(up.url)
        await asyncio.gather(*(self._probe(up) for up in self.upstreams.values()))
        self._task = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for up in self.upstreams.values():
            if up.client is not None:
                await up.client.close()
                up.client = None

    # ---- health ------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Probe what is due: ready servers every ``probe_interval_s``, the others at their
        backoff."""
        while True:
            now = time.monotonic()
            due = [u for u in self.upstreams.values() if u.next_probe <= now]
            if due:
                await asyncio.gather(*(self._probe(u) for u in due))
            await asyncio.sleep(0.05)

    async def _probe(self, up: Upstream) -> None:
        try:
            ok = bool(
                await up.client.is_model_ready(MODEL_NAME, client_timeout=self.probe_timeout_s)
            )
            why = "" if ok else f"model {MODEL_NAME} not ready"
        except Exception as e:  # noqa: BLE001 - refused, timed out, reset: all mean "not ready"
            ok, why = False, str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if ok:
            self._up(up)
        else:
            self._down(up, why, probed=True)

    def _up(self, up: Upstream) -> None:
        now = time.monotonic()
        if not up.ready:
            if up.failures:  # it was in rotation before
                LOG.warning("Triton %s is ready again after %.1f s; back in rotation", up.url,
                            now - up.down_since)  # fmt: skip
            else:
                LOG.info("Triton %s is ready; in rotation", up.url)
            up.ready, up.down_since, up.last_error = True, None, ""
        up.backoff_s = 0.0
        up.next_probe = now + self.probe_interval_s

    def _down(self, up: Upstream, why: str, probed: bool = False) -> None:
        """Take ``up`` out of rotation at once; a failed probe also backs off the next one."""
        now = time.monotonic()
        up.last_error = why
        if up.ready:
            LOG.warning("Triton %s out of rotation: %s", up.url, why)
            up.failures += 1
        if up.ready or up.down_since is None:
            up.ready, up.down_since, up.backoff_s = False, now, 0.0
            up.next_probe = now  # probe it soon: a refused row may be a blip
        if probed:
            up.backoff_s = min(self.max_backoff_s, max(self.min_backoff_s, 2 * up.backoff_s))
            up.next_probe = now + up.backoff_s

    async def readiness(self) -> dict[str, bool]:
        """For each server: is it in rotation (its model ready at the last probe)?"""
        return {u.url: u.ready for u in self.upstreams.values()}

    def state(self) -> dict[str, dict]:
        """Each server's state (``/readyz``) and the pool's counters."""
        now = time.monotonic()
        return {u.url: u.state(now) for u in self.upstreams.values()}

    def retry_after_s(self) -> int:
        """When a server may be back: the soonest probe of one out of rotation (>= 1 s)."""
        now = time.monotonic()
        waits = [u.next_probe - now for u in self.upstreams.values() if not u.ready]
        return max(1, math.ceil(min(waits, default=1.0)))

    def rows_in_flight(self) -> int:
        return sum(u.in_flight for u in self.upstreams.values())

    def metric_lines(self) -> list[str]:
        """The pool's Prometheus lines (appended to the gateway's /metrics)."""
        ups = list(self.upstreams.values())
        lines = ["# HELP iap_rt_upstream_ready 1 if the Triton server is in rotation.",
                 "# TYPE iap_rt_upstream_ready gauge"]  # fmt: skip
        lines += [f'iap_rt_upstream_ready{{upstream="{u.url}"}} {int(u.ready)}' for u in ups]
        lines += ["# HELP iap_rt_upstream_rows_total Rows each Triton server answered.",
                  "# TYPE iap_rt_upstream_rows_total counter"]  # fmt: skip
        lines += [f'iap_rt_upstream_rows_total{{upstream="{u.url}"}} {u.rows}' for u in ups]
        lines += ["# HELP iap_rt_upstream_failures_total Times a server left the rotation.",
                  "# TYPE iap_rt_upstream_failures_total counter"]  # fmt: skip
        lines += [f'iap_rt_upstream_failures_total{{upstream="{u.url}"}} {u.failures}' for u in ups]
        lines += ["# HELP iap_rt_upstream_retries_total Rows sent again to another server.",
                  "# TYPE iap_rt_upstream_retries_total counter",
                  f"iap_rt_upstream_retries_total {self.retries}"]  # fmt: skip
        return lines

    # ---- inference ---------------------------------------------------------------------
    async def infer(self, row: Row, timeout_s: float) -> RowResult:
        """Generate one image on the least busy ready server, on another if that one is
        unreachable; raise :class:`UpstreamError`."""
        tried: set[str] = set()
        last: UpstreamError | None = None
        deadline = time.monotonic() + timeout_s
        while True:
            ready = [u for u in self.upstreams.values() if u.ready and u.url not in tried]
            if not ready:
                if last is not None:
                    last.retry_after = self.retry_after_s()
                    raise last
                raise UpstreamError(
                    503, "triton_unavailable", "no Triton server is ready ("
                    + ", ".join(f"{u.url}: {u.last_error or 'not ready'}"
                                for u in self.upstreams.values()) + ")",
                    retry_after=self.retry_after_s(),
                )  # fmt: skip
            up = min(ready, key=lambda u: u.in_flight)
            if tried:
                self.retries += 1
                LOG.warning("retrying a row (seed %d) on %s", row.seed, up.url)
            tried.add(up.url)
            try:
                return await self._infer_on(up, row, max(0.001, deadline - time.monotonic()))
            except UpstreamError as e:
                if e.status != 503:
                    raise
                self._down(up, e.message)
                last = e

    async def _infer_on(self, up: Upstream, row: Row, timeout_s: float) -> RowResult:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inputs = []
        for name, array in row.to_inputs().items():
            tensor = grpcclient.InferInput(name, list(array.shape), INPUTS[name][1])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
        up.in_flight += 1
        try:
            result = await up.client.infer(
                MODEL_NAME, inputs, outputs=outputs,
                timeout=max(1, int(timeout_s * 1e6)), client_timeout=timeout_s,
            )  # fmt: skip
        except InferenceServerException as e:
            raise classify(f"{e.status() or ''} {e.message() or e}".strip()) from e
        finally:
            up.in_flight -= 1
        up.rows += 1
        error = result.as_numpy("error").reshape(-1)[0]
        if error:
            err = json.loads(bytes(error).decode("utf-8"))
            code = "invalid_value" if err["status"] == 400 else "generation_failed"
            raise UpstreamError(int(err["status"]), code, err["message"])
        params = json.loads(bytes(result.as_numpy("params").reshape(-1)[0]).decode("utf-8"))
        batch = int(result.as_numpy("batch").reshape(-1)[0])
        return RowResult(result.as_numpy("image")[0], params, batch)
