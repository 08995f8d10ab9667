"""Edits in the runtime pipeline (embedded model): generations and edits of the same steps and
size share UNet batches, each image byte-identical to the same request alone; the edit rules
of the request owner; inpainting keeps every pixel outside the mask."""

import numpy as np
import pytest

from iap_rt.backends.ort import OrtBackend
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.pipeline import Pipeline
from iap_rt.requests import PromptRequest, RequestError, resolve

MODEL = ModelDir.open(default_model_dir())


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(MODEL, OrtBackend("cpu", threads=1), progress=False)


def _scene():
    img = np.full((32, 32, 3), 200, np.uint8)
    img[8:20, 2:14] = (220, 30, 30)  # a red square on the left
    return img


def _half_mask():
    m = np.zeros((32, 32), np.uint8)
    m[:, 16:] = 255
    return m


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_mixed_batch_each_image_equals_it_alone(pipe, scheduler):
    common = dict(steps=8, scheduler=scheduler)
    requests = [
        PromptRequest("左边有一个红色的圆", seed=1, batch_size=2, **common),
        PromptRequest("左边有一个蓝色的圆", seed=2, image=_scene(), strength=0.6, **common),
        PromptRequest(
            "右边有一个绿色的十字",
            seed=3,
            image=_scene(),
            mask=_half_mask(),
            strength=0.75,
            batch_size=2,
            **common,
        ),  # fmt: skip
        PromptRequest(
            "上面有一个黄色的三角形", seed=4, image=_scene(), strength=1.0, guidance=1.0, **common
        ),  # fmt: skip
    ]
    together = pipe.generate(requests)
    for r, got in zip(requests, together):
        alone = pipe.generate([r])[0]
        assert np.array_equal(got.images, alone.images)
        assert np.array_equal(got.latents, alone.latents)
    assert [len(r.images) for r in together] == [2, 1, 2, 1]


def test_inpainting_keeps_every_pixel_outside_the_mask(pipe):
    scene, mask = _scene(), _half_mask()
    for blur in (0, 4):
        out = pipe.generate([PromptRequest("右边有一个绿色的十字", seed=3, image=scene, mask=mask,
                                           steps=6, mask_blur=blur)])[0]  # fmt: skip
        assert np.array_equal(out.images[0][:, :16], scene[:, :16])
        assert not np.array_equal(out.images[0][:, 16:], scene[:, 16:])
        assert out.params["inpaint"] is True and out.params["mask_blur"] == blur


def test_image_to_image_at_low_strength_stays_close_to_its_input(pipe):
    scene = _scene()
    low = pipe.generate([PromptRequest("左边有一个红色的方块", image=scene, strength=0.2)])[0]
    high = pipe.generate([PromptRequest("左边有一个红色的方块", image=scene, strength=1.0)])[0]
    err = [np.abs(x.images[0].astype(int) - scene).mean() for x in (low, high)]
    assert err[0] < err[1]


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"image": np.zeros((30, 32, 3), np.uint8)}, "image", "32x16 or 32x32"),
        ({"image": np.zeros((32, 32), np.uint8)}, "image", "(H, W, 3) uint8"),
        ({"image": np.zeros((32, 32, 3), np.uint8), "height": 48}, "height", "was asked"),
        ({"image": np.zeros((32, 32, 3), np.uint8), "strength": 0}, "strength", "(0, 1]"),
        ({"image": np.zeros((32, 32, 3), np.uint8), "strength": 1.5}, "strength", "(0, 1]"),
        ({"image": np.zeros((32, 32, 3), np.uint8), "strength": 0.01}, "strength", "no step"),
        ({"strength": 0.5}, "strength", "no image"),
        ({"mask": np.ones((32, 32))}, "mask", "no image"),
        ({"image": np.zeros((32, 32, 3), np.uint8), "mask": np.ones((16, 32))}, "mask",
         "image's size"),
        ({"image": np.zeros((32, 32, 3), np.uint8), "mask": np.zeros((32, 32))}, "mask",
         "selects nothing"),
        ({"image": np.zeros((32, 32, 3), np.uint8), "mask": np.ones((32, 32)),
          "mask_blur": -1}, "mask_blur", "0 to 64"),
    ],
)  # fmt: skip
def test_edit_rules_name_their_field(change, field, words):
    with pytest.raises(RequestError) as e:
        resolve(MODEL, PromptRequest(**({"prompt": "x", "steps": 25} | change)))
    assert e.value.field == field
    assert words in str(e.value)
