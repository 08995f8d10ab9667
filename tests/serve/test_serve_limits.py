"""Back-pressure and deadlines of ``iap-rt serve``: a full queue answers 429 with
``Retry-After``, a request past ``--timeout-s`` answers 504, and the server keeps serving.
One server: batching off (``--max-batch 1``), 2 queued images at most, a 1 s deadline."""

from __future__ import annotations

import threading
import time

import pytest

from iap_rt.serve.metrics import parse_text

from .conftest import call, start_server

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(
        tmp_path_factory.mktemp("limits"), "--max-batch", "1", "--max-queue", "2",
        "--timeout-s", "1", "--max-queue-delay-ms", "0",
    )  # fmt: skip
    yield s
    assert s.stop() == 0, s.log_tail()


def queue_depth(server) -> float:
    return parse_text(call(server.url, "GET", "/metrics")[1])["iap_rt_queue_depth"]


def test_a_full_queue_answers_429_with_retry_after(server):
    first: list = []
    t = threading.Thread(
        target=lambda: first.append(
            call(
                server.url, "POST", GEN, {"prompt": "山水画", "n": 2, "steps": 150, "size": "64x64"}
            )
        )
    )
    t.start()
    deadline = time.monotonic() + 30
    while queue_depth(server) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    status, doc, headers = call(server.url, "POST", GEN, {"prompt": "山水画", "steps": 1})
    t.join(120)
    assert status == 429, doc
    assert doc["error"]["type"] == "rate_limit_error" and doc["error"]["code"] == "queue_full"
    assert int(headers["retry-after"]) >= 1
    assert first and first[0][0] in (200, 504)  # the admitted request was answered


def test_a_request_past_the_deadline_answers_504(server):
    t0 = time.monotonic()
    status, doc, _ = call(
        server.url, "POST", GEN, {"prompt": "山水画", "steps": 150, "size": "64x64"}
    )
    elapsed = time.monotonic() - t0
    assert status == 504, doc
    assert doc["error"]["type"] == "server_error" and doc["error"]["code"] == "timeout"
    assert elapsed < 30
    assert call(server.url, "GET", "/healthz")[0] == 200
    assert queue_depth(server) == 0
