"""The Triton callable of the model ``iap_rt``: queued rows -> multi-prompt Pipeline calls.

Triton's dynamic batcher hands :class:`ImageModel` the requests it queued together. A row the
gateway resolved against this same model (its ``model_key``) is trusted as it is; any other row
(a direct Triton client, a gateway for another model) is resolved here by
:func:`iap_rt.requests.resolve`, the rules of ``iap-rt generate``: each row is checked once on
its way. Rows are grouped by what must be shared in one UNet call (steps, scheduler, height,
width), and each group runs as one ``Pipeline.generate`` call: one UNet batch of different
prompts, each with its own seed, negative prompt and guidance. Every image equals
``iap-rt generate`` with the same prompt, seed and settings, byte for byte.

A row that fails answers with an ``error`` output and leaves the others alone: a group that
raises is retried row by row, so one poisoned request does not fail the images batched with it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict

import numpy as np

from iap_rt.errors import ConfigError, IapRtError, InputError
from iap_rt.pipeline import Pipeline
from iap_rt.requests import ResolvedRequest, resolve, trusted
from iap_rt.serve.protocol import Row, error_json, rows_from_inputs

LOG = logging.getLogger("iap_rt.serve")
FAULT_ENV = "IAP_RT_SERVE_FAULT_PROMPT"


class InjectedFault(RuntimeError):
    """Raised for a row whose prompt is the fault-injection prompt (for failure drills)."""


class ImageModel:
    """One Triton model instance: ``__call__(requests) -> responses`` on its own Pipeline.

    ``fault_prompt``: a prompt whose rows raise :class:`InjectedFault` inside the generation
    (``$IAP_RT_SERVE_FAULT_PROMPT``), to check in a real deployment that a request that raises
    is answered with 500 and the server goes on serving. Unset: no fault injection."""

    def __init__(self, pipeline: Pipeline, fault_prompt: str | None = None):
        self.pipeline = pipeline
        self.fault_prompt = fault_prompt or None
        self._lock = threading.Lock()  # one generation at a time per instance

    def __call__(self, requests) -> list[dict[str, np.ndarray]]:
        """PyTriton's batch callable: one output dict per request, in order."""
        rows: list[tuple[int, Row]] = []  # (flat index, row)
        per_request: list[list[int]] = []
        results: dict[int, tuple] = {}  # flat index -> (image, params, batch, error)
        n = 0
        for req in requests:
            idx = []
            for row in rows_from_inputs(dict(req.items())):
                i, n = n, n + 1
                idx.append(i)
                if isinstance(row, str):
                    results[i] = _failed(400, row, "invalid_request_error")
                else:
                    rows.append((i, row))
            per_request.append(idx)

        groups: dict[tuple, list[tuple[int, ResolvedRequest]]] = defaultdict(list)
        model = self.pipeline.model
        for i, row in rows:
            try:
                request = trusted(model, row.fields(), row.model_key) or resolve(
                    model, row.request()
                )
            except IapRtError as e:
                results[i] = _failed(400, str(e), "invalid_request_error")
                continue
            groups[request.call_key].append((i, request))
        with self._lock:
            for members in groups.values():
                self._run_group(members, results)
        return [_response([results[i] for i in idx]) for idx in per_request]

    def _run_group(self, members: list[tuple[int, ResolvedRequest]], results: dict) -> None:
        """One Pipeline call for requests sharing a call key; on an exception, each alone."""
        try:
            if self.fault_prompt and any(r.prompt == self.fault_prompt for _, r in members):
                raise InjectedFault(f"injected fault for prompt {self.fault_prompt!r}")
            out = self.pipeline.generate([r for _, r in members])
        except Exception as e:
            if len(members) > 1:
                LOG.warning("a batch of %d failed (%s); retrying row by row", len(members), e)
                for m in members:
                    self._run_group([m], results)
                return
            (i, _), status = members[0], 400 if isinstance(e, (InputError, ConfigError)) else 500
            if status == 500:
                LOG.error("generation failed", exc_info=e)
            kind = "invalid_request_error" if status == 400 else "server_error"
            results[i] = _failed(status, f"{type(e).__name__}: {e}", kind)
            return
        for (i, _), res in zip(members, out):
            params = json.dumps(dict(res.params, seed=res.seeds[0]), ensure_ascii=False)
            results[i] = (res.images[0], params.encode("utf-8"), len(members), b"")


def _failed(status: int, message: str, kind: str) -> tuple:
    return (None, b"", 0, error_json(status, message, kind))


def _response(parts: list[tuple]) -> dict[str, np.ndarray]:
    """One request's outputs. Failed rows get a zero image of the others' shape (1x1 if all
    failed); rows of one request must share a size, or the request fails as a whole."""
    shapes = {p[0].shape for p in parts if p[0] is not None}
    if len(shapes) > 1:
        msg = error_json(400, "the rows of one request must share height and width",
                         "invalid_request_error")  # fmt: skip
        parts = [(None, b"", 0, msg) for _ in parts]
        shapes = set()
    shape = shapes.pop() if shapes else (1, 1, 3)
    images = np.stack([p[0] if p[0] is not None else np.zeros(shape, np.uint8) for p in parts])
    return {
        "image": images,
        "params": np.array([[p[1]] for p in parts], dtype=np.object_),
        "batch": np.array([[p[2]] for p in parts], dtype=np.int32),
        "error": np.array([[p[3]] for p in parts], dtype=np.object_),
    }
