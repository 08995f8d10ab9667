"""The runtime (ONNX Runtime + numpy schedulers) against its PyTorch twin
(:class:`iap_rt.train.torch_pipeline.TorchPipeline`: diffusers UNet/VAE/schedulers + our encoder in
torch) on the same tiny model and seed."""

from __future__ import annotations

import numpy as np
import pytest

from iap_rt.backends.ort import OrtBackend
from iap_rt.modeldir import ModelDir
from iap_rt.pipeline import Pipeline, initial_noise
from iap_rt.schedulers import SCHEDULERS
from iap_rt.train.torch_pipeline import DIFFUSERS_SCHEDULERS, TorchPipeline


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_sd_dir, tiny_encoder_dir):
    return TorchPipeline.from_dirs(tiny_model_dir, tiny_sd_dir, tiny_encoder_dir)


def test_every_runtime_scheduler_has_a_diffusers_twin():
    assert set(DIFFUSERS_SCHEDULERS) == set(SCHEDULERS)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_runtime_matches_pytorch_loop(tiny_model_dir, reference, scheduler):
    pipe = Pipeline(ModelDir.open(tiny_model_dir), OrtBackend("cpu", threads=1), progress=False)
    noise = initial_noise(seed=11, batch_size=1, shape=(4, 8, 8))
    args = ("左边有一个红色的圆", "模糊")
    kw = dict(steps=10, guidance=7.5, seed=11, height=64, width=64, scheduler=scheduler)
    got = pipe(*args, **kw)
    assert np.array_equal(initial_noise(11, 1, (4, 8, 8)), noise)
    ref = reference(*args, **kw, latents=noise)
    diff = np.abs(got.latents - ref.latents).max()
    assert diff <= 1e-3, f"final latents differ by {diff}"
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    # the twin draws the runtime's noise itself for the same seed
    again = reference(*args, **kw)
    assert np.array_equal(again.latents, ref.latents)
    t = ref.timings
    assert len(t.unet_s) == len(t.unet_cpu_s) == 10 and t.total_s >= t.loop_s > 0


def test_guidance_off_and_batches(tiny_model_dir, reference):
    """guidance <= 1: one UNet pass per step on the prompt alone; image i of a batch equals
    seed + i alone, as in the runtime."""
    pipe = Pipeline(ModelDir.open(tiny_model_dir), OrtBackend("cpu", threads=1), progress=False)
    kw = dict(steps=4, guidance=1.0, height=64, width=64, scheduler="ddim")
    got = pipe("一只猫", seed=3, batch_size=2, **kw)
    ref = reference("一只猫", seed=3, batch_size=2, **kw)
    assert np.abs(got.latents - ref.latents).max() <= 1e-3
    alone = reference("一只猫", seed=4, **kw)
    assert np.allclose(alone.latents[0], ref.latents[1], atol=1e-5)


def test_reference_refuses_what_it_cannot_run(reference):
    import torch

    from iap_rt.errors import ConfigError, InputError
    from iap_rt.train.torch_pipeline import diffusers_scheduler

    with pytest.raises(ConfigError, match="unknown scheduler 'heun'") as e:
        diffusers_scheduler("heun", reference.scheduler_config)
    assert "ddim, euler, dpm++" in e.value.fix
    emb = torch.zeros(3, 32, 32)  # fits neither B=2 nor 2B=4
    with pytest.raises(InputError, match="fits neither B=2 nor 2B=4"):
        reference.denoise(emb, np.zeros((2, 4, 8, 8), np.float32), 2, 7.5, "ddim")
