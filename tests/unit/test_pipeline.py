"""Pipeline behaviour on the embedded model (ONNX Runtime, no torch)."""

import numpy as np
import pytest

from iap_rt.backends.ort import OrtBackend
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.pipeline import Pipeline, initial_noise


class Recording:
    """Wraps a real runner and records the feeds it receives."""

    def __init__(self, runner):
        self.runner, self.name, self.calls = runner, runner.name, []

    def run(self, feeds):
        self.calls.append({k: v.shape for k, v in feeds.items()})
        return self.runner.run(feeds)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(
        ModelDir.open(default_model_dir()), OrtBackend("cpu", threads=1), progress=False
    )


def _record(pipe):
    for k in ("unet", "text_encoder"):
        r = pipe.runners[k]
        pipe.runners[k] = Recording(r.runner if isinstance(r, Recording) else r)
    pipe.clear_cache()
    return pipe.runners["unet"], pipe.runners["text_encoder"]


KW = dict(height=64, width=64, steps=3)


def _latent(pipe, n):
    """UNet sample shape for ``n`` latents of a KW-sized image (from the model's dims)."""
    f = pipe.dims.vae_scale_factor
    return (n, pipe.dims.latent_channels, KW["height"] // f, KW["width"] // f)


def test_guidance_batches_uncond_and_cond(pipe):
    unet, text = _record(pipe)
    pipe("山水画", guidance=7.5, batch_size=3, **KW)
    assert [c["sample"] for c in unet.calls] == [_latent(pipe, 6)] * 3  # UNet batch 2B
    assert text.calls == [
        {
            "input_ids": (2, pipe.dims.text_max_length),
            "attention_mask": (2, pipe.dims.text_max_length),
        }
    ]


@pytest.mark.parametrize("g", [0.0, 1.0])
def test_guidance_at_most_one_halves_the_unet_batch(pipe, g):
    unet, text = _record(pipe)
    r = pipe("山水画", guidance=g, batch_size=3, **KW)
    assert [c["sample"] for c in unet.calls] == [_latent(pipe, 3)] * 3
    assert text.calls[0]["input_ids"][0] == 1  # no negative prompt encoded
    assert r.images.shape == (3, 64, 64, 3) and r.images.dtype == np.uint8


def test_image_i_of_a_batch_equals_seed_plus_i_alone(pipe):
    batch = pipe("一只猫", seed=10, batch_size=3, **KW)
    alone = pipe("一只猫", seed=12, batch_size=1, **KW)
    assert batch.seeds == [10, 11, 12]
    np.testing.assert_allclose(batch.latents[2], alone.latents[0], atol=1e-5)
    assert np.abs(batch.images[2].astype(int) - alone.images[0].astype(int)).max() <= 1


def test_noise_is_reproducible_and_position_independent():
    a = initial_noise(5, 3, (4, 8, 8))
    assert np.array_equal(a, initial_noise(5, 3, (4, 8, 8)))
    assert np.array_equal(a[1:], initial_noise(6, 2, (4, 8, 8)))
    assert a.dtype == np.float32 and abs(float(a.std()) - 1) < 0.2


def test_empty_prompt_and_negative_prompt_change_the_result(pipe):
    base = pipe("", seed=1, **KW)
    neg = pipe("", negative_prompt="模糊的照片", seed=1, **KW)
    assert base.images.shape == (1, 64, 64, 3)
    assert not np.array_equal(base.latents, neg.latents)


def test_all_schedulers_run_and_differ(pipe):
    outs = {
        s: pipe("山水画", seed=2, scheduler=s, **KW).latents for s in ("ddim", "euler", "dpm++")
    }
    assert all(np.isfinite(v).all() for v in outs.values())
    assert not np.allclose(outs["ddim"], outs["euler"])


def test_timings_are_recorded(pipe):
    t = pipe("山水画", **KW).timings
    assert len(t.unet_s) == 3 and t.loop_s >= sum(t.unet_s) and t.total_s >= t.loop_s
    assert t.overhead_step_s >= 0
