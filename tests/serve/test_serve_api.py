"""``iap-rt serve`` end to end: a real Triton (PyTriton), the real gateway on real sockets, a
real browser. One server for the module: embedded model, API key, a fault-injection prompt."""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from iap_rt.images import read_params
from iap_rt.modeldir import default_model_dir, read_manifest
from iap_rt.serve.metrics import parse_text

from .conftest import call, pngs, start_server

KEY = "s3cret-key"
FAULT = "触发故障"
AUTH = {"Authorization": f"Bearer {KEY}"}
GEN = "/v1/images/generations"
STEPS = 6
MODEL_ID = read_manifest(default_model_dir())["model_id"]  # the embedded default serves


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    (d / "key.txt").write_text(KEY + "\n")
    s = start_server(
        d, "--api-key-file", "key.txt", "--max-queue-delay-ms", "200", "--max-batch", "8",
        "--max-prompt-chars", "50", "--max-pixels", "20000",
        env={"IAP_RT_SERVE_FAULT_PROMPT": FAULT}, top=("-v",),  # -v: the log counts resolves
    )  # fmt: skip
    yield s
    assert s.stop() == 0, s.log_tail()


def post(server, body, headers=AUTH, **kw):
    return call(server.url, "POST", GEN, body, headers, **kw)


def test_health_ready_and_info(server):
    assert call(server.url, "GET", "/healthz")[:2] == (200, {"status": "ok"})
    status, doc, _ = call(server.url, "GET", "/readyz")
    assert status == 200 and doc["ready"] is True and list(doc["triton"].values()) == [True]
    status, info, _ = call(server.url, "GET", "/info")
    assert status == 200 and info["model_id"] == MODEL_ID and info["auth_required"]
    assert info["default_size"] == 32 and info["size_multiple"] == 16


def test_16_concurrent_clients_get_seed_exact_images(server, reference):
    """16 threads at once; every image is byte-identical to `iap-rt generate` with the same
    prompt, seed, negative prompt and guidance, and Triton put several into one UNet batch."""
    prompts = ["左边有一个红色的圆", "一个蓝色的正方形，位于右边", "中间有一个绿色的三角形",
               "上面有一个黄色的十字"]  # fmt: skip
    jobs = [
        dict(prompt=prompts[i % 4], seed=100 + i, steps=STEPS, n=1 + (i % 3 == 0),
             guidance_scale=[7.5, 1.0, 3.0, 12.0][i % 4], negative_prompt="模糊" * (i % 2))
        for i in range(16)
    ]  # fmt: skip
    barrier = threading.Barrier(16)

    def one(job):
        barrier.wait()
        return post(server, job)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, jobs))
    batches = []
    for job, (status, doc, _) in zip(jobs, answers):
        assert status == 200, doc
        assert len(doc["data"]) == job["n"] and isinstance(doc["created"], int)
        for i, (png, item) in enumerate(zip(pngs(doc), doc["data"])):
            expected = reference(job["prompt"], seed=job["seed"] + i, steps=STEPS,
                                 guidance=job["guidance_scale"], negative=job["negative_prompt"])  # fmt: skip
            assert png == expected, (job, i)
            assert item["seed"] == job["seed"] + i and item["parameters"]["steps"] == STEPS
    metrics = parse_text(call(server.url, "GET", "/metrics")[1])
    assert metrics["iap_rt_images_generated_total"] >= 21
    batches = metrics["iap_rt_images_generated_total"] / metrics["iap_rt_batches_total"]
    assert batches > 1.0, "no two images ever shared a UNet batch"


def test_pngs_carry_the_parameters(server, tmp_path):
    status, doc, _ = post(server, {"prompt": "山水画", "seed": 9, "steps": 2, "size": "32x16"})
    assert status == 200, doc
    (tmp_path / "a.png").write_bytes(pngs(doc)[0])
    p = read_params(tmp_path / "a.png")
    assert (p["prompt"], p["seed"], p["steps"], p["width"], p["height"]) == ("山水画", 9, 2, 32, 16)
    assert p["backend"].startswith("ort") and p["model_id"] == MODEL_ID


def test_random_seed_is_reported(server):
    status, doc, _ = post(server, {"prompt": "山水画", "steps": 1, "n": 2})
    assert status == 200, doc
    a, b = (item["seed"] for item in doc["data"])
    assert b == a + 1


BAD = [  # body, status, param, code
    (b"{not json", 400, None, "invalid_json"),
    ([1, 2], 400, None, "invalid_json"),
    ({}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": "  "}, 400, "prompt", "invalid_value"),
    ({"prompt": 3}, 400, "prompt", "invalid_value"),
    ({"prompt": "长" * 51}, 400, "prompt", "prompt_too_long"),
    ({"prompt": "a", "negative_prompt": "长" * 51}, 400, "negative_prompt", "prompt_too_long"),
    ({"prompt": "a", "n": 0}, 400, "n", "invalid_value"),
    ({"prompt": "a", "n": 11}, 400, "n", "invalid_value"),
    ({"prompt": "a", "n": 1.5}, 400, "n", "invalid_value"),
    ({"prompt": "a", "size": "big"}, 400, "size", "invalid_value"),
    ({"prompt": "a", "size": "30x32"}, 400, "size", "invalid_value"),
    ({"prompt": "a", "size": "160x160"}, 400, "size", "too_many_pixels"),
    ({"prompt": "a", "steps": 0}, 400, "steps", "invalid_value"),
    ({"prompt": "a", "steps": 151}, 400, "steps", "invalid_value"),
    ({"prompt": "a", "guidance_scale": -1}, 400, "guidance_scale", "invalid_value"),
    ({"prompt": "a", "guidance_scale": "high"}, 400, "guidance_scale", "invalid_value"),
    (b'{"prompt": "a", "guidance_scale": NaN}', 400, "guidance_scale", "invalid_value"),
    ({"prompt": "a", "seed": -1}, 400, "seed", "invalid_value"),
    ({"prompt": "a", "seed": 2**63 - 1, "n": 2}, 400, "seed", "invalid_value"),
    ({"prompt": "a", "scheduler": "pndm"}, 400, "scheduler", "invalid_value"),
    ({"prompt": "a", "response_format": "url"}, 400, "response_format", "unsupported_value"),
    ({"prompt": "a", "quality": "hd"}, 400, "quality", "unknown_parameter"),
    (json.dumps({"prompt": "a" * 70000}).encode(), 413, None, "request_too_large"),
]


@pytest.mark.parametrize("body, status, param, code", BAD)
def test_bad_requests_get_4xx_in_openai_shape(server, body, status, param, code):
    got, doc, _ = post(server, body, timeout=60)
    assert got == status, doc
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["message"]
    assert (doc["error"]["param"], doc["error"]["code"]) == (param, code)


@pytest.mark.parametrize(
    "method, path, status, code",
    [("GET", GEN, 405, "method_not_allowed"), ("GET", "/v2/nothing", 404, "not_found"),
     ("GET", "/static/../../etc/passwd", 404, "not_found")],
)  # fmt: skip
def test_framework_errors_use_the_openai_shape_too(server, method, path, status, code):
    got, doc, _ = call(server.url, method, path, headers=AUTH)
    assert got == status and doc["error"]["code"] == code, doc


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_required(server, headers):
    status, doc, hdrs = post(server, {"prompt": "a", "steps": 1}, headers=headers)
    assert status == 401 and doc["error"]["code"] == "invalid_api_key"
    assert hdrs.get("www-authenticate", hdrs.get("WWW-Authenticate")) == "Bearer"
    assert call(server.url, "GET", "/v1/models")[0] == 401
    assert call(server.url, "GET", "/v1/models", headers=AUTH)[1]["data"][0]["id"] == MODEL_ID


def test_a_request_that_raises_gets_500_and_the_server_keeps_serving(server, reference):
    """The fault prompt raises inside the generation; a request batched with it still gets
    its image, and the server answers the next requests."""
    jobs = [{"prompt": FAULT, "steps": 2, "seed": 1}, {"prompt": "山水画", "steps": 2, "seed": 4}]
    with ThreadPoolExecutor(2) as pool:
        (s1, d1, _), (s2, d2, _) = pool.map(lambda j: post(server, j), jobs)
    assert s1 == 500 and d1["error"]["type"] == "server_error", d1
    assert "InjectedFault" in d1["error"]["message"]
    assert s2 == 200 and pngs(d2)[0] == reference("山水画", seed=4, steps=2)
    status, doc, _ = post(server, {"prompt": "山水画", "steps": 2, "seed": 5})
    assert status == 200 and pngs(doc)[0] == reference("山水画", seed=5, steps=2)
    assert call(server.url, "GET", "/readyz")[0] == 200


def test_metrics_are_prometheus_text(server):
    status, text, hdrs = call(server.url, "GET", "/metrics")
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    m = parse_text(text)
    g = 'iap_rt_requests_total{route="/v1/images/generations",status="%d"}'
    assert m[g % 200] >= 1 and m[g % 400] >= 1 and m[g % 401] >= 1 and m[g % 500] >= 1
    assert m["iap_rt_request_duration_seconds_count"] == m[g % 200]
    assert m['iap_rt_request_duration_seconds_bucket{le="+Inf"}'] == m[g % 200]
    assert m["iap_rt_batch_size_count"] == m["iap_rt_images_generated_total"] > 0
    assert m["iap_rt_queue_depth"] == 0 and m["iap_rt_requests_in_flight"] == 0


def test_generate_server_writes_the_same_pngs(server, tmp_path, monkeypatch, capsys):
    from iap_rt.cli import main

    args = ["generate", "一个蓝色的正方形，位于右边", "--steps", "3", "--seed", "11",
            "--batch-size", "2", "--guidance", "5", "--negative", "模糊", "--no-progress"]  # fmt: skip
    main([*args, "--out", str(tmp_path / "local")])
    monkeypatch.setenv("IAP_RT_API_KEY", KEY)
    with pytest.raises(SystemExit) as e:  # a conflicting flag: one line, exit 2
        main([*args, "--server", server.url, "--backend", "ort"])
    assert e.value.code == 2
    main([*args, "--server", server.url, "--out", str(tmp_path / "remote"), "--json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["seed"] for x in lines] == [11, 12]
    for name in ("00000.png", "00001.png"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    one = [a if a != "2" else "1" for a in args]  # --batch-size 1: one file per format
    for suffix in (".jpg", ".webp"):  # the local run's pixels and parameters, in that format
        main([*one, "--out", str(tmp_path / f"local{suffix}")])
        main([*one, "--server", server.url, "--out", str(tmp_path / f"remote{suffix}")])
        remote, local = tmp_path / f"remote{suffix}", tmp_path / f"local{suffix}"
        assert Image.open(remote).format == Image.open(local).format != "PNG"
        assert read_params(remote) == read_params(local) and read_params(remote)["seed"] == 11
        if suffix == ".webp":  # lossless: the very pixels
            assert np.array_equal(np.asarray(Image.open(remote)), np.asarray(Image.open(local)))
    monkeypatch.setenv("IAP_RT_API_KEY", "wrong")
    with pytest.raises(SystemExit) as e:
        main([*args, "--server", server.url, "--out", str(tmp_path / "x")])
    assert e.value.code == 1 and not (tmp_path / "x").exists()


def test_openai_python_client(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=300)
    result = client.images.generate(
        model=MODEL_ID, prompt="左边有一个红色的圆", n=2, size="32x32",
        response_format="b64_json", extra_body={"seed": 21, "steps": 3, "guidance_scale": 6.0},
    )  # fmt: skip
    import base64

    got = [base64.b64decode(d.b64_json) for d in result.data]
    assert got == [reference("左边有一个红色的圆", seed=s, steps=3, guidance=6.0) for s in (21, 22)]
    # no guidance_scale: the model's own default (the embedded toy model's manifest says 3)
    result = client.images.generate(
        prompt="左边有一个红色的圆", size="32x32", response_format="b64_json",
        extra_body={"steps": 3},
    )  # fmt: skip
    png = base64.b64decode(result.data[0].b64_json)
    params = read_params(io.BytesIO(png))
    assert params["guidance"] == 3.0
    seed = params["seed"]  # the server drew it
    assert png == reference("左边有一个红色的圆", seed=seed, steps=3, guidance=3.0)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a", size="30x30", response_format="b64_json")
    assert e.value.status_code == 400 and "multiple of 16" in str(e.value)


def test_one_validation_per_request_and_the_models_notice(server):
    """The gateway resolves a request once (iap_rt.requests) and Triton trusts its rows; a
    row sent to Triton directly is resolved there. A prompt outside the toy model's world gets
    the model's notice beside ``data``."""
    import time

    import tritonclient.grpc as grpcclient

    from iap_rt.serve.protocol import INPUTS, MODEL_NAME, Row

    def resolved(expected=None):
        for _ in range(50):  # the log line may trail the answer by a moment
            n = server.log.read_text("utf-8", "replace").count("resolved request:")
            if expected is None or n >= expected:
                return n
            time.sleep(0.1)
        return n

    before = resolved()
    status, doc, _ = post(server, {"prompt": "山水画", "n": 3, "steps": 2, "seed": 5})
    assert status == 200 and len(doc["data"]) == 3, doc
    assert "--model DIR" in doc["warning"] and "coloured shapes" in doc["warning"]
    status, doc, _ = post(server, {"prompt": "左边有一个红色的圆", "n": 2, "steps": 2})
    assert status == 200 and "warning" not in doc
    assert resolved(before + 2) - before == 2  # 2 requests, 5 rows: one validation each
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inputs = []
    for name, array in Row("左边有一个红色的圆", seed=1, steps=2).to_inputs().items():
        inputs.append(grpcclient.InferInput(name, list(array.shape), INPUTS[name][1]))
        inputs[-1].set_data_from_numpy(array)
    result = client.infer(MODEL_NAME, inputs)
    client.close()
    assert result.as_numpy("error")[0, 0] == b"" and result.as_numpy("image").shape == (
        1,
        32,
        32,
        3,
    )
    assert resolved(before + 3) - before == 3  # not resolved by a gateway: Triton resolves it


def test_web_page_in_a_real_browser(server):
    """Type a Chinese prompt into the page in headless Chromium, press generate, an image
    with its parameters appears; the page loads nothing from outside the gateway."""
    from .browser import chromium_page

    outside = []
    with chromium_page() as page:
        page.on("request", lambda r: r.url.startswith(server.url) or outside.append(r.url))
        page.goto(server.url + "/")
        page.fill("#api_key", KEY)
        page.fill("#prompt", "左边有一个红色的圆")
        page.fill("#steps", "3")
        page.fill("#seed", "8")
        page.click("#generate")
        img = page.wait_for_selector("#results figure img", timeout=240_000)
        src = img.get_attribute("src")
        caption = page.inner_text("#results figure figcaption")
        width = page.evaluate("document.querySelector('#results img').naturalWidth")
    assert src.startswith("data:image/png;base64,") and width == 32
    assert "左边有一个红色的圆" in caption and "seed 8" in caption
    assert "guidance 3 " in caption  # the model's default, filled in from /info
    assert outside == []
