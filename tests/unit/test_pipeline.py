"""Pipeline behaviour on the embedded model (ONNX Runtime, no torch)."""

import json

import numpy as np
import pytest

from iap_rt.backends.ort import OrtBackend
from iap_rt.errors import ConfigError, InputError
from iap_rt.modeldir import ModelDir, default_model_dir
from iap_rt.pipeline import Pipeline, PromptRequest, initial_noise


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


def test_a_request_without_guidance_takes_the_models_default(model_copy):
    """None -> manifest default_guidance: 1.0 there turns guidance off (UNet batch B, not 2B)
    and the result records the guidance used."""
    m = json.loads((model_copy / "manifest.json").read_text())
    (model_copy / "manifest.json").write_text(json.dumps(m | {"default_guidance": 1.0}))
    own = Pipeline(ModelDir.open(model_copy), OrtBackend("cpu", threads=1), progress=False)
    unet, _ = _record(own)
    r = own("山水画", batch_size=2, **KW)
    assert [c["sample"] for c in unet.calls] == [_latent(own, 2)] * 3
    assert r.params["guidance"] == 1.0
    explicit = own.generate([PromptRequest("山水画", guidance=5.0)], **KW)[0]
    assert explicit.params["guidance"] == 5.0


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


# ---- several prompts in one call ---------------------------------------------------------------
REQUESTS = [
    PromptRequest("左边有一个红色的圆", "", seed=5, guidance=7.5, batch_size=2),
    PromptRequest("一个蓝色的正方形，位于右边", "模糊", seed=9, guidance=0.0),
    PromptRequest("上方画着一个绿十字", "模糊", seed=11, guidance=3.0, batch_size=3),
]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
@pytest.mark.parametrize("chunk_size", [8, 2])
def test_each_image_of_a_multi_prompt_call_equals_it_alone(pipe, scheduler, chunk_size):
    pipe.chunk_size = chunk_size
    try:
        results = pipe.generate(REQUESTS, steps=3, height=64, width=64, scheduler=scheduler)
    finally:
        pipe.chunk_size = 8
    assert len(results) == len(REQUESTS)
    for got, r in zip(results, REQUESTS):
        alone = pipe(
            r.prompt, r.negative_prompt, steps=3, guidance=r.guidance, seed=r.seed,
            height=64, width=64, batch_size=r.batch_size, scheduler=scheduler,
        )  # fmt: skip
        assert got.seeds == alone.seeds == [r.seed + i for i in range(r.batch_size)]
        assert np.array_equal(got.images, alone.images)  # byte for byte
        assert np.array_equal(got.latents, alone.latents)
        assert got.params == alone.params


def test_multi_prompt_unet_batch_is_uncond_of_guided_plus_cond_of_all(pipe):
    unet, _ = _record(pipe)
    pipe.generate(REQUESTS, **KW)
    n, guided = 6, 5  # 2 + 1 + 3 images, the middle request unguided
    assert [c["sample"] for c in unet.calls] == [_latent(pipe, guided + n)] * KW["steps"]


def test_large_calls_run_in_chunks_of_chunk_size(pipe):
    unet, _ = _record(pipe)
    pipe.chunk_size = 2
    try:
        r = pipe("山水画", guidance=7.5, batch_size=5, **KW)
    finally:
        pipe.chunk_size = 8
    batches = [c["sample"][0] for c in unet.calls]
    assert batches == [4] * 3 + [4] * 3 + [2] * 3  # chunks of 2, 2, 1 images, guided
    assert r.images.shape[0] == 5 and r.seeds == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("g", [float("nan"), float("inf"), -0.5, 1e30, 101.0, True])
def test_guidance_must_be_finite_and_in_range(pipe, g):
    with pytest.raises(InputError, match="guidance must be a number from 0 to 100"):
        pipe("山水画", guidance=g, **KW)


def test_every_image_seed_stays_in_range(pipe):
    pipe("山水画", seed=2**63 - 1, batch_size=1, **KW)  # the last seed itself is fine
    with pytest.raises(InputError, match=r"image 1 would use seed 9223372036854775808"):
        pipe("山水画", seed=2**63 - 1, batch_size=2, **KW)


def test_custom_latents_are_checked(pipe):
    with pytest.raises(InputError, match="latents of shape"):
        pipe("山水画", latents=np.zeros((1, 1, 2, 2), np.float32), **KW)


def test_chunk_size_is_checked():
    with pytest.raises(ConfigError, match="chunk size"):
        Pipeline(ModelDir.open(default_model_dir()), OrtBackend("cpu"), chunk_size=0)
