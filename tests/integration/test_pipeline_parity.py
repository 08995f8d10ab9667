"""The runtime (ONNX Runtime + numpy schedulers) against a PyTorch reference loop
(diffusers UNet/VAE/schedulers + our encoder in torch) on the same tiny model and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iap_rt.backends.ort import OrtBackend
from iap_rt.modeldir import ModelDir
from iap_rt.pipeline import Pipeline, initial_noise, to_uint8

DIFFUSERS_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


@pytest.fixture(scope="module")
def torch_models(tiny_sd_dir, tiny_encoder_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from iap_rt.train.encoder import ChineseTextEncoder

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").eval()
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae").eval()
    enc = ChineseTextEncoder.load(tiny_encoder_dir).eval()
    return unet, vae, enc


def reference_loop(models, pipe, prompt, negative, steps, guidance, scheduler, latents):
    """The same algorithm written with diffusers components in torch (float32)."""
    import diffusers

    unet, vae, enc = models
    cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler])
    sched = cls.from_config(pipe.model.scheduler_config())
    if scheduler == "dpm++":
        sched = cls.from_config(sched.config, algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(steps)
    tok = pipe.tokenizer([negative, prompt])
    with torch.no_grad():
        emb = enc(torch.from_numpy(tok.input_ids), torch.from_numpy(tok.attention_mask))
        x = torch.from_numpy(latents) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eps = unet(inp, t, encoder_hidden_states=emb).sample
            u, c = eps.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
        image = vae.decode(x / vae.config.scaling_factor).sample
    return x.numpy(), image.numpy()


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_runtime_matches_pytorch_loop(tiny_model_dir, torch_models, scheduler):
    pipe = Pipeline(ModelDir.open(tiny_model_dir), OrtBackend("cpu", threads=1), progress=False)
    noise = initial_noise(seed=11, batch_size=1, shape=(4, 8, 8))
    got = pipe(
        "左边有一个红色的圆",
        "模糊",
        steps=10,
        guidance=7.5,
        seed=11,
        height=64,
        width=64,
        scheduler=scheduler,
    )
    assert np.array_equal(initial_noise(11, 1, (4, 8, 8)), noise)
    ref_latents, ref_image = reference_loop(
        torch_models, pipe, "左边有一个红色的圆", "模糊", 10, 7.5, scheduler, noise
    )
    diff = np.abs(got.latents - ref_latents).max()
    assert diff <= 1e-3, f"final latents differ by {diff}"
    assert np.abs(got.images.astype(int) - to_uint8(ref_image).astype(int)).max() <= 1
