"""``POST /v1/images/edits`` end to end: a real Triton and gateway, the official OpenAI client,
OpenAI's mask convention (fully transparent = edit), edits byte-identical to ``iap-rt generate
--image --mask`` with the same seed, and every bad upload a 4xx in OpenAI's shape."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from .conftest import start_server

httpx = pytest.importorskip("httpx")

KEY = "edit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EDITS = "/v1/images/edits"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("edits")
    (d / "key.txt").write_text(KEY)
    s = start_server(d, "--api-key-file", "key.txt", "--max-pixels", "20000",
                     "--max-upload-bytes", "200000", name="edits")  # fmt: skip
    yield s
    assert s.stop() == 0, s.log_tail()


def _png(array, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _scene() -> np.ndarray:
    a = np.full((32, 32, 3), 200, np.uint8)
    a[8:20, 2:14] = (220, 30, 30)
    return a


def _openai_mask(right_half=True) -> bytes:
    """RGBA: fully transparent where the image is to be edited (OpenAI's convention)."""
    m = np.full((32, 32, 4), 255, np.uint8)
    if right_half:
        m[:, 16:, 3] = 0
    return _png(m, "RGBA")


def _post(server, files, data, headers=AUTH):
    return httpx.post(server.url + EDITS, files=files, data=data, headers=headers, timeout=300)


def _local(prompt, seed, mask, steps, strength=0.8):
    """What `iap-rt generate --image --mask` writes for the same request (in-process)."""
    from iap_rt.images import png_bytes
    from iap_rt.pipeline import Pipeline
    from iap_rt.requests import PromptRequest

    pipe = Pipeline.from_dir(progress=False)
    r = pipe.generate([PromptRequest(prompt, seed=seed, steps=steps, image=_scene(), mask=mask,
                                     strength=strength)])[0]  # fmt: skip
    return png_bytes(r.images[0], dict(r.params, seed=seed))


def test_the_openai_client_edits_with_a_transparent_mask(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=300)
    result = client.images.edit(
        image=("scene.png", _png(_scene()), "image/png"),
        mask=("mask.png", _openai_mask(), "image/png"),
        prompt="右边有一个蓝色的十字", n=2, response_format="b64_json",
        extra_body={"seed": 7, "steps": 4},
    )  # fmt: skip
    got = [base64.b64decode(d.b64_json) for d in result.data]
    white = np.zeros((32, 32), np.uint8)
    white[:, 16:] = 255  # the transparent half, in the CLI's white = repaint
    assert got == [_local("右边有一个蓝色的十字", s, white, 4) for s in (7, 8)]
    pixels = np.asarray(Image.open(io.BytesIO(got[0])))
    assert np.array_equal(pixels[:, :16], _scene()[:, :16])  # kept: the input's own


def test_no_mask_edits_the_whole_image_and_mixes_with_generations(server):
    r = _post(server, {"image": ("s.png", _png(_scene()))},
              {"prompt": "左边有一个蓝色的方块", "strength": "0.6", "seed": "3", "steps": "5"})  # fmt: skip
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["data"][0]["parameters"]["strength"] == 0.6
    assert doc["data"][0]["parameters"]["inpaint"] is False
    png = base64.b64decode(doc["data"][0]["b64_json"])
    assert png == _local("左边有一个蓝色的方块", 3, None, 5, strength=0.6)


def _bomb() -> bytes:
    return _png(np.zeros((4000, 4000), np.uint8), "L")  # 16 M pixels in a few kB


BAD = [  # files, data, status, param, code
    ({}, {"prompt": "x"}, 400, "image", "missing_required_parameter"),
    ({"image": ("t.txt", b"not an image")}, {"prompt": "x"}, 400, "image", "invalid_image"),
    ({"image": ("c.png", _png(np.random.default_rng(1).integers(0, 255, (32, 32, 3),
                                                                np.uint8))[:1500])},
     {"prompt": "x"}, 400, "image", "invalid_image"),
    ({"image": ("b.png", _bomb())}, {"prompt": "x"}, 400, "image", "too_many_pixels"),
    ({"image": ("s.png", _png(np.zeros((32, 32, 3), np.uint8))),
      "mask": ("m.png", _png(np.zeros((16, 16, 4), np.uint8), "RGBA"))}, {"prompt": "x"}, 400,
     "mask", "invalid_value"),
    ({"image": ("s.png", _png(np.zeros((32, 32, 3), np.uint8))),
      "mask": ("m.png", _openai_mask(right_half=False))}, {"prompt": "x"}, 400, "mask",
     "invalid_value"),
    ({"image": ("s.png", _png(np.zeros((32, 32, 3), np.uint8)))},
     {"prompt": "x", "strength": "1.5"}, 400, "strength", "invalid_value"),
    ({"image": ("s.png", _png(np.zeros((32, 32, 3), np.uint8)))},
     {"prompt": "x", "strength": "0"}, 400, "strength", "invalid_value"),
    ({"image": ("s.png", _png(np.zeros((30, 32, 3), np.uint8)))}, {"prompt": "x"}, 400,
     "image", "invalid_value"),
    ({"image": ("big.png", np.random.default_rng(0).bytes(300000))}, {"prompt": "x"}, 413, None,
     "request_too_large"),
]  # fmt: skip


@pytest.mark.parametrize("files, data, status, param, code", BAD)
def test_bad_uploads_get_4xx_in_openai_shape(server, files, data, status, param, code):
    r = _post(server, files, data)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["message"], err


def test_edits_need_the_api_key(server):
    r = _post(server, {"image": ("s.png", _png(_scene()))}, {"prompt": "x"}, headers={})
    assert r.status_code == 401


def test_generate_server_edits_write_the_same_pngs(server, tmp_path, monkeypatch):
    from iap_rt.cli import main

    Image.fromarray(_scene()).save(tmp_path / "s.png")
    m = np.zeros((32, 32), np.uint8)
    m[:, 16:] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    args = ["generate", "右边有一个蓝色的十字", "--image", str(tmp_path / "s.png"), "--mask",
            str(tmp_path / "m.png"), "--steps", "4", "--seed", "5", "--batch-size", "2",
            "--strength", "0.9", "--no-progress"]  # fmt: skip
    main([*args, "--out", str(tmp_path / "local")])
    monkeypatch.setenv("IAP_RT_API_KEY", KEY)
    main([*args, "--server", server.url, "--out", str(tmp_path / "remote")])
    for name in ("00000.png", "00001.png"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_web_page_edit_mode_in_a_real_browser(server, tmp_path):
    """Upload an image, paint the right half with the brush, set the strength, generate: the
    result appears beside its input, inpainted (the unpainted left part is the input's own)."""
    from .browser import chromium_page

    Image.fromarray(_scene()).save(tmp_path / "scene.png")
    with chromium_page() as page:
        page.goto(server.url + "/")
        page.fill("#api_key", KEY)
        page.check("#mode_edit")
        page.set_input_files("#edit_image", str(tmp_path / "scene.png"))
        page.wait_for_function("document.querySelector('#mask_canvas').width === 32")
        page.fill("#brush", "3")
        box = page.query_selector("#mask_canvas").bounding_box()
        scale = box["width"] / 32
        page.mouse.move(box["x"] + 24 * scale, box["y"] + 2 * scale)
        page.mouse.down()
        for y in range(2, 32, 2):  # a vertical stroke at x = 24, radius 3: x 21..27
            page.mouse.move(box["x"] + 24 * scale, box["y"] + y * scale)
        page.mouse.up()
        page.fill("#prompt", "右边有一个蓝色的十字")
        page.fill("#steps", "4")
        page.fill("#seed", "2")
        page.fill("#strength", "0.9")
        page.click("#generate")
        page.wait_for_selector("#results figure img.result", timeout=240_000)
        src = page.get_attribute("#results figure img.result", "src")
        before = page.get_attribute("#results figure img.input", "src")
        caption = page.inner_text("#results figure figcaption")
    assert before.startswith("data:image/png") and "strength 0.9" in caption
    assert "inpainted" in caption
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out[:, :16], _scene()[:, :16])  # never painted: the input's own
