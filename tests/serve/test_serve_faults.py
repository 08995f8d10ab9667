"""Serving under faults, with real Triton processes: a gateway in front of two Tritons routes
around one killed with ``kill -9`` (rows in flight on it are generated again on the other,
byte-identical since every row is seeded), answers 503 with ``Retry-After`` when none is
ready, and takes a restarted Triton back; a plain ``iap-rt serve`` whose own Triton dies
answers what is in flight and exits 1, every time (never a C++ abort)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from iap_rt.serve.metrics import parse_text

from .conftest import call, pngs, start_server

GEN = "/v1/images/generations"


def _node(tmp_path, name, ports=None):
    return start_server(tmp_path, "--no-gateway", ready=None, name=name, ports=ports)


def _wait(predicate, timeout_s=60.0, every=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def _metrics(gateway) -> dict:
    return parse_text(call(gateway.url, "GET", "/metrics")[1])


def test_the_gateway_routes_around_a_killed_triton_and_takes_it_back(tmp_path, reference):
    a, b = _node(tmp_path, "a"), _node(tmp_path, "b")
    urls = [f"127.0.0.1:{a.grpc_port}", f"127.0.0.1:{b.grpc_port}"]
    gw = start_server(tmp_path, "--triton-url", urls[0], "--triton-url", urls[1], name="gw")
    try:
        assert _wait(lambda: all(call(gw.url, "GET", "/readyz")[1]["triton"].values()))
        # rows in flight on both Tritons when one is killed: every one still answered, the
        # dead one's generated again on the other (same seed: the same image)
        bodies = [{"prompt": "左边有一个红色的圆", "seed": s, "steps": 100} for s in range(4)]
        answers = [None] * len(bodies)

        def post(i):
            answers[i] = call(gw.url, "POST", GEN, bodies[i])

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        in_flight = f'iap_rt_upstream_rows_total{{upstream="{urls[0]}"}}'
        assert _wait(lambda: _metrics(gw)["iap_rt_requests_in_flight"] == len(bodies))
        os.kill(a.tritonserver_pid(), signal.SIGKILL)
        for t in threads:
            t.join(300)
        for body, (status, doc, _) in zip(bodies, answers):
            assert status == 200, doc
            assert pngs(doc)[0] == reference(body["prompt"], seed=body["seed"], steps=100)
        m = _metrics(gw)
        assert m["iap_rt_upstream_retries_total"] >= 1, m
        assert m[f'iap_rt_upstream_ready{{upstream="{urls[0]}"}}'] == 0
        status, ready, _ = call(gw.url, "GET", "/readyz")
        assert status == 200 and ready["triton"] == {urls[0]: False, urls[1]: True}
        assert ready["upstreams"][urls[0]]["failures"] == 1 and ready["retries"] >= 1
        # while one is down: every request is answered by the other, no 503
        for s in range(6):
            status, doc, _ = call(gw.url, "POST", GEN, {"prompt": "中间有一个绿色的三角形",
                                                         "seed": 10 + s, "steps": 2})  # fmt: skip
            assert status == 200, doc
        assert a.proc.wait(60) == 1  # its own Triton died: the node exits 1
        # both down: 503 with Retry-After, in OpenAI's shape
        os.kill(b.tritonserver_pid(), signal.SIGKILL)
        assert _wait(lambda: call(gw.url, "GET", "/readyz")[0] == 503)
        status, doc, headers = call(gw.url, "POST", GEN, {"prompt": "红圆", "steps": 2})
        assert status == 503 and doc["error"]["type"] == "server_error", doc
        assert int(headers["retry-after"]) >= 1
        assert b.proc.wait(60) == 1
        # a restarted Triton (same port) is probed back into rotation and gets rows again
        rows_before = _metrics(gw)[in_flight]
        a = _node(tmp_path, "a2", ports=a.ports)
        assert _wait(lambda: call(gw.url, "GET", "/readyz")[0] == 200, timeout_s=30)
        status, doc, _ = call(gw.url, "POST", GEN, {"prompt": "红圆", "steps": 2, "seed": 1})
        assert status == 200, doc
        assert _metrics(gw)[in_flight] == rows_before + 1
    finally:
        for s in (gw, a, b):
            if s.proc.poll() is None:
                s.stop()


@pytest.mark.parametrize("attempt", range(10))
def test_serve_exits_1_when_its_own_triton_dies(tmp_path, attempt):
    server = start_server(tmp_path, name=f"own{attempt}")
    answers = []
    threads = [threading.Thread(target=lambda s=s: answers.append(call(
        server.url, "POST", GEN, {"prompt": "红圆", "seed": s, "steps": 150}))) for s in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    assert _wait(lambda: parse_text(call(server.url, "GET", "/metrics")[1])[
        "iap_rt_requests_in_flight"] == 2)  # fmt: skip
    os.kill(server.tritonserver_pid(), signal.SIGKILL)
    assert server.proc.wait(120) == 1, server.log_tail()
    for t in threads:
        t.join(60)
    assert sorted(a[0] for a in answers) == [503, 503]  # answered, not dropped
    log = server.log.read_text("utf-8", "replace")
    assert "terminate called" not in log and "Fatal Python error" not in log
