"""The gateway's client of one or more Triton servers (async gRPC, KServe v2).

:class:`TritonPool` sends one-row inferences of the model ``iap_rt`` (see ``protocol.py``) to
the server with the fewest rows in flight, and turns Triton's failures into
:class:`UpstreamError` with the HTTP status the gateway answers: a full queue 429, a request
past its deadline 504, an unreachable server 503, anything else 500. Several ``--triton-url``
servers (one per GPU or node) are the scale-out: the gateway spreads rows over them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from iap_rt.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS, Row


@dataclass
class RowResult:
    """One generated image and the parameters its PNG records."""

    image: np.ndarray  # (H, W, 3) uint8
    params: dict
    batch: int  # images that shared its UNet batch


class UpstreamError(Exception):
    """A row that Triton did not generate: ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def classify(message: str) -> UpstreamError:
    """Map a Triton/gRPC failure message to the HTTP status it means."""
    m = message.lower()
    if "maximum queue size" in m:
        return UpstreamError(429, "queue_full", "the Triton queue is full")
    if "deadline" in m or "timeout" in m or "timed out" in m:
        return UpstreamError(504, "timeout", "the request took longer than the server allows")
    if "unavailable" in m or "connect" in m or "not ready" in m or "unknown model" in m:
        return UpstreamError(503, "triton_unavailable", f"Triton is not reachable: {message}")
    return UpstreamError(500, "triton_error", f"Triton failed: {message}")


class TritonPool:
    """Async gRPC clients of ``urls`` (``HOST:PORT`` of Triton gRPC endpoints)."""

    def __init__(self, urls: list[str]):
        if not urls:
            raise ValueError("TritonPool needs at least one Triton gRPC URL")
        self.urls = list(urls)
        self._clients: dict = {}
        self._in_flight = dict.fromkeys(self.urls, 0)

    async def start(self) -> None:
        """Open the channels (inside the running event loop)."""
        import tritonclient.grpc.aio as grpcclient

        for url in self.urls:
            self._clients[url] = grpcclient.InferenceServerClient(url)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def readiness(self, timeout_s: float = 2.0) -> dict[str, bool]:
        """For each server: is the model ``iap_rt`` loaded and ready?"""
        out = {}
        for url, client in self._clients.items():
            try:
                out[url] = bool(await client.is_model_ready(MODEL_NAME, client_timeout=timeout_s))
            except Exception:
                out[url] = False
        return out

    def rows_in_flight(self) -> int:
        return sum(self._in_flight.values())

    async def infer(self, row: Row, timeout_s: float) -> RowResult:
        """Generate one image on the least busy server; raise :class:`UpstreamError`."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        url = min(self.urls, key=lambda u: self._in_flight[u])
        inputs = []
        for name, array in row.to_inputs().items():
            tensor = grpcclient.InferInput(name, list(array.shape), INPUTS[name][1])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
        self._in_flight[url] += 1
        try:
            result = await self._clients[url].infer(
                MODEL_NAME, inputs, outputs=outputs,
                timeout=max(1, int(timeout_s * 1e6)), client_timeout=timeout_s,
            )  # fmt: skip
        except InferenceServerException as e:
            raise classify(str(e)) from e
        finally:
            self._in_flight[url] -= 1
        error = result.as_numpy("error").reshape(-1)[0]
        if error:
            err = json.loads(bytes(error).decode("utf-8"))
            code = "invalid_value" if err["status"] == 400 else "generation_failed"
            raise UpstreamError(int(err["status"]), code, err["message"])
        params = json.loads(bytes(result.as_numpy("params").reshape(-1)[0]).decode("utf-8"))
        batch = int(result.as_numpy("batch").reshape(-1)[0])
        return RowResult(result.as_numpy("image")[0], params, batch)
