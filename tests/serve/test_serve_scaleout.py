"""Scale-out layout and graceful shutdown: ``iap-rt serve --no-gateway`` (Triton alone, as on a
GPU node) behind ``iap-rt serve --triton-url`` (the gateway alone); SIGTERM finishes the
requests in flight and exits 0, in either role and in the default one-process-tree mode."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from iap_rt.serve.metrics import parse_text

from .conftest import call, pngs, start_server

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def triton_node(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("node"), "--no-gateway", ready=None, name="node")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, triton_node):
    s = start_server(
        tmp_path_factory.mktemp("gw"), "--triton-url", f"127.0.0.1:{triton_node.grpc_port}",
        name="gateway",
    )  # fmt: skip
    yield s
    s.stop()


def in_flight_requests(server, bodies, timeout_s=60):
    """Start one thread per body; return (threads, answers) once all are in flight."""
    answers = [None] * len(bodies)

    def run(i):
        answers[i] = call(server.url, "POST", GEN, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and None in answers:
        m = parse_text(call(server.url, "GET", "/metrics")[1])
        if m["iap_rt_requests_in_flight"] == len(bodies):
            return threads, answers
        time.sleep(0.02)
    raise AssertionError(f"the requests were never all in flight at once: {answers}")


def test_gateway_in_front_of_a_remote_triton(gateway, triton_node, reference):
    status, doc, _ = call(
        gateway.url, "POST", GEN, {"prompt": "中间有一个绿色的三角形", "seed": 3, "steps": 4}
    )
    assert status == 200, doc
    assert pngs(doc)[0] == reference("中间有一个绿色的三角形", seed=3, steps=4)
    status, ready, _ = call(gateway.url, "GET", "/readyz")
    assert ready["triton"] == {f"127.0.0.1:{triton_node.grpc_port}": True}


def test_sigterm_gateway_answers_in_flight_and_exits_0(gateway, reference):
    bodies = [{"prompt": "山水画", "seed": s, "steps": 120} for s in range(3)]
    threads, answers = in_flight_requests(gateway, bodies)
    assert gateway.stop() == 0, gateway.log_tail()
    for t in threads:
        t.join(120)
    for body, (status, doc, _) in zip(bodies, answers):
        assert status == 200, doc
        assert pngs(doc)[0] == reference("山水画", seed=body["seed"], steps=120)
    assert call(gateway.url, "GET", "/healthz", timeout=5)[0] == 0  # no longer listening


def test_sigterm_triton_node_finishes_in_flight_and_exits_0(triton_node):
    """Direct KServe v2 gRPC clients of the Triton node: rows in flight at SIGTERM complete."""
    import tritonclient.grpc as grpcclient

    from iap_rt.serve.protocol import INPUTS, MODEL_NAME, Row

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton_node.grpc_port}")
    done: list = []

    def callback(result, error):
        done.append((result, error))

    for seed in range(2):
        inputs = []
        for name, array in Row("山水画", seed=seed, steps=150).to_inputs().items():
            inputs.append(grpcclient.InferInput(name, list(array.shape), INPUTS[name][1]))
            inputs[-1].set_data_from_numpy(array)
        client.async_infer(MODEL_NAME, inputs, callback)
    time.sleep(0.3)
    assert len(done) < 2  # still in flight at SIGTERM
    assert triton_node.stop() == 0, triton_node.log_tail()
    deadline = time.monotonic() + 60
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(done) == 2 and all(e is None for _, e in done), done
    for result, _ in done:
        assert result.as_numpy("image").shape == (1, 32, 32, 3)
        assert result.as_numpy("error")[0, 0] == b""
        assert np.asarray(result.as_numpy("image")).any()
    client.close()


def test_sigterm_one_process_tree_answers_in_flight_and_exits_0(tmp_path, reference):
    server = start_server(tmp_path, name="tree")
    bodies = [{"prompt": "上面有一个黄色的十字", "seed": s, "steps": 120, "n": 2} for s in (0, 5)]
    threads, answers = in_flight_requests(server, bodies)
    assert server.stop() == 0, server.log_tail()
    for t in threads:
        t.join(120)
    for body, (status, doc, _) in zip(bodies, answers):
        assert status == 200, doc
        seeds = [body["seed"], body["seed"] + 1]
        assert pngs(doc) == [reference(body["prompt"], seed=s, steps=120) for s in seeds]
