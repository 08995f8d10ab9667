"""Image editing against diffusers itself: the runtime's image to image against
``StableDiffusionImg2ImgPipeline`` and its inpainting (latent blending, any 4-channel UNet)
against ``StableDiffusionInpaintPipeline``, on the tiny model, fed the same prompt embeddings
(the exported Chinese encoder's), the same image latents (the runtime's VAE-encoder sample,
passed as 4-channel latents, which both diffusers pipelines take as they are) and the same
initial noise (diffusers' ``randn_tensor`` returns the runtime's); final latents and pixels."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from iap_rt.backends.ort import OrtBackend  # noqa: E402
from iap_rt.modeldir import ModelDir  # noqa: E402
from iap_rt.pipeline import Pipeline, initial_noise  # noqa: E402
from iap_rt.requests import PromptRequest  # noqa: E402
from iap_rt.train.torch_pipeline import diffusers_scheduler  # noqa: E402

PROMPT, NEGATIVE = "左边有一个红色的圆", "模糊"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline(ModelDir.open(tiny_model_dir), OrtBackend("cpu", threads=1), progress=False)


def _image(seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((64, 64, 3), np.uint8)
    img[...] = rng.integers(0, 255, 3)  # a flat colour with a bright square
    img[16:40, 20:44] = rng.integers(0, 255, 3)
    return img


def _reference(cls, pipe, tiny_sd_dir, scheduler, monkeypatch, module, noise):
    base = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_sd_dir, safety_checker=None, requires_safety_checker=False
    )
    ref = cls(**base.components)
    ref.scheduler = diffusers_scheduler(scheduler, pipe.model.scheduler_config())
    ref.set_progress_bar_config(disable=True)
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(noise.copy()))
    emb = pipe.encode([PROMPT, NEGATIVE]).astype(np.float32)
    return ref, torch.from_numpy(emb[:1]), torch.from_numpy(emb[1:])


def _compare(got, ref_latents, ref_pixels, where=None):
    diff = np.abs(got.latents - ref_latents).max()
    assert diff <= 1e-3, f"final latents differ by {diff}"
    pixels = (ref_pixels * 255).round().astype(int)  # diffusers' "np" output in [0, 1]
    mine = got.images.astype(int)
    if where is not None:
        mine, pixels = mine[:, where], pixels[:, where]
    assert np.abs(mine - pixels).max() <= 1


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_image_to_image_matches_diffusers(pipe, tiny_sd_dir, scheduler, strength, monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod

    req = pipe.resolve(PromptRequest(PROMPT, NEGATIVE, seed=5, guidance=7.5, steps=10,
                                     scheduler=scheduler, image=_image(), strength=strength))  # fmt: skip
    got = pipe.generate([req])[0]
    init = pipe._encode_edits([req])[0].init
    noise = initial_noise(5, 1, init.shape[1:])
    ref, cond, uncond = _reference(diffusers.StableDiffusionImg2ImgPipeline, pipe, tiny_sd_dir,
                                   scheduler, monkeypatch, mod, noise)  # fmt: skip
    kw = dict(image=torch.from_numpy(init), strength=strength, num_inference_steps=10,
              guidance_scale=7.5, prompt_embeds=cond, negative_prompt_embeds=uncond)  # fmt: skip
    lat = ref(**kw, output_type="latent").images.numpy()
    pix = ref(**kw, output_type="np").images
    _compare(got, lat, pix)
    assert got.params["strength"] == strength and got.params["inpaint"] is False


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_with_a_4_channel_unet_matches_diffusers(pipe, tiny_sd_dir, scheduler,
                                                            strength, monkeypatch):  # fmt: skip
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as mod

    image = _image(1)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # repaint the right half
    req = pipe.resolve(PromptRequest(PROMPT, NEGATIVE, seed=9, guidance=7.5, steps=10,
                                     scheduler=scheduler, image=image, mask=mask,
                                     strength=strength, mask_blur=0))  # fmt: skip
    got = pipe.generate([req])[0]
    init = pipe._encode_edits([req])[0].init
    noise = initial_noise(9, 1, init.shape[1:])
    ref, cond, uncond = _reference(diffusers.StableDiffusionInpaintPipeline, pipe, tiny_sd_dir,
                                   scheduler, monkeypatch, mod, noise)  # fmt: skip
    from PIL import Image

    kw = dict(image=torch.from_numpy(init), mask_image=Image.fromarray(mask),
              masked_image_latents=torch.from_numpy(init), strength=strength, height=64,
              width=64, num_inference_steps=10, guidance_scale=7.5, prompt_embeds=cond,
              negative_prompt_embeds=uncond)  # fmt: skip
    lat = ref(**kw, output_type="latent").images.numpy()
    pix = ref(**kw, output_type="np").images
    inside = np.zeros((64, 64), bool)
    inside[:, 32:] = True
    _compare(got, lat, pix, where=inside)  # inside the mask: what diffusers decoded
    assert np.array_equal(got.images[0][~inside], image[~inside])  # outside: the input's own
