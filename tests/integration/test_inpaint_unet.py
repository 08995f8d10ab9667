"""An inpainting UNet (9 input channels) plugged into a model made with the plain base:
``iap-rt export --unet`` takes it (architecture ``sd-inpaint``, VAE encoder included), and the
runtime matches diffusers' ``StableDiffusionInpaintPipeline`` with that UNet, fed the same
prompt embeddings (the exported Chinese encoder's), the same initial noise, the same image
latents and masked-image latents (the runtime's VAE-encoder samples, passed as latents):
final latents and pixels inside the mask, for inpainting, image to image (no mask: the
whole image) and plain generation (an all-white mask over no image)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from iap_rt.backends.ort import OrtBackend  # noqa: E402
from iap_rt.errors import ArtifactError, ConfigError, ShapeContractError  # noqa: E402
from iap_rt.modeldir import ModelDir  # noqa: E402
from iap_rt.pipeline import Pipeline, initial_noise  # noqa: E402
from iap_rt.requests import PromptRequest  # noqa: E402
from iap_rt.specs import spec_hash  # noqa: E402
from iap_rt.train.torch_pipeline import diffusers_scheduler  # noqa: E402

PROMPT, NEGATIVE = "右边有一个蓝色的方块", "模糊"


@pytest.fixture(scope="module")
def inpaint_unet_dir(tmp_path_factory):
    from iap_rt.train.tiny import make_tiny_inpaint_unet

    return make_tiny_inpaint_unet(tmp_path_factory.mktemp("inpaint") / "unet")


@pytest.fixture(scope="module")
def inpaint_model_dir(tiny_sd_dir, tiny_encoder_dir, inpaint_unet_dir, tmp_path_factory):
    from iap_rt.export.stage import export_model_dir

    out = tmp_path_factory.mktemp("inpaint") / "model"
    return export_model_dir(tiny_sd_dir, tiny_encoder_dir, out, model_id="tiny-inpaint",
                            unet=inpaint_unet_dir)  # fmt: skip


@pytest.fixture(scope="module")
def pipe(inpaint_model_dir):
    return Pipeline(ModelDir.open(inpaint_model_dir), OrtBackend("cpu", threads=1),
                    progress=False)  # fmt: skip


def test_export_writes_an_inpainting_model(inpaint_model_dir):
    md = ModelDir.open(inpaint_model_dir)
    m = md.manifest
    assert md.architecture == "sd-inpaint" and md.inpainting_unet
    assert m["spec_hash"] == spec_hash("sd-inpaint") != spec_hash()
    assert m["unet_source"]["kind"] == "inpainting"
    assert m["dims"]["latent_channels"] == 4  # the latents, not the UNet's 9 inputs
    assert {"unet", "vae_encoder"} <= set(m["networks"])
    import onnx

    graph = onnx.load(md.network_path("unet"), load_external_data=False).graph
    sample = next(i for i in graph.input if i.name == "sample")
    assert sample.type.tensor_type.shape.dim[1].dim_value == 9


def test_a_model_missing_its_vae_encoder_is_refused_on_open(inpaint_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(inpaint_model_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["networks"]["vae_encoder"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="vae_encoder") as e:
        ModelDir.open(copy)
    assert "--networks vae_encoder" in e.value.fix


def test_the_unet_refuses_4_channel_feeds(pipe):
    feeds = {"sample": np.zeros((1, 4, 8, 8), np.float32),
             "timestep": np.zeros((1,), np.float32),
             "encoder_hidden_states": np.zeros((1, 32, 32), np.float32)}  # fmt: skip
    with pytest.raises(ShapeContractError, match="axis I=4, expected 9"):
        pipe.runners["unet"].run(feeds)


def test_another_unet_architecture_is_still_refused(tiny_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from iap_rt.export.plugin import resolve_unet
    from iap_rt.train.tiny import TINY_UNET

    UNet2DConditionModel(**{**TINY_UNET, "in_channels": 8}).save_pretrained(tmp_path / "u")
    with pytest.raises(ConfigError, match="in_channels 8"):
        resolve_unet(tiny_sd_dir, tmp_path / "u")


def _image(seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((64, 64, 3), np.uint8)
    img[...] = rng.integers(0, 255, 3)
    img[8:40, 12:44] = rng.integers(0, 255, 3)
    return img


def _diffusers(pipe, tiny_sd_dir, inpaint_unet_dir, scheduler, monkeypatch, noise):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as mod

    base = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_sd_dir, safety_checker=None, requires_safety_checker=False
    )
    unet = diffusers.UNet2DConditionModel.from_pretrained(inpaint_unet_dir)
    ref = diffusers.StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    ref.scheduler = diffusers_scheduler(scheduler, pipe.model.scheduler_config())
    ref.set_progress_bar_config(disable=True)
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: torch.from_numpy(noise.copy()))
    emb = pipe.encode([PROMPT, NEGATIVE]).astype(np.float32)
    return ref, torch.from_numpy(emb[:1]), torch.from_numpy(emb[1:])


CASES = {  # name: (image, mask: 1 = repaint, strength)
    "inpaint": ("image", "right", 1.0),
    "inpaint-0.7": ("image", "right", 0.7),
    "image-to-image": ("image", None, 0.6),
    "generate": (None, None, None),
}


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
@pytest.mark.parametrize("case", list(CASES))
def test_inpainting_unet_matches_diffusers(pipe, tiny_sd_dir, inpaint_unet_dir, scheduler, case,
                                           monkeypatch):  # fmt: skip
    from PIL import Image

    kind, where, strength = CASES[case]
    image = _image(2) if kind else None
    mask = None
    if where:
        mask = np.zeros((64, 64), np.uint8)
        mask[:, 32:] = 255
    req = pipe.resolve(PromptRequest(PROMPT, NEGATIVE, seed=11, guidance=7.5, steps=8,
                                     scheduler=scheduler, image=image, mask=mask,
                                     strength=strength, mask_blur=0, height=64,
                                     width=64))  # fmt: skip
    got = pipe.generate([req])[0]
    edit = pipe._encode_edits([req])[0]
    masked = torch.from_numpy(edit.cond[:, 1:])  # what the runtime's UNet read beside the mask
    assert np.array_equal(edit.cond[0, 0], (mask if where else np.full((64, 64), 255))[::8, ::8]
                          / 255)  # fmt: skip
    init = edit.init if kind else np.zeros((1, 4, 8, 8), np.float32)
    noise = initial_noise(11, 1, (4, 8, 8))
    ref, cond, uncond = _diffusers(pipe, tiny_sd_dir, inpaint_unet_dir, scheduler, monkeypatch,
                                   noise)  # fmt: skip
    white = np.full((64, 64), 255, np.uint8)
    kw = dict(image=torch.from_numpy(init), mask_image=Image.fromarray(mask if where else white),
              masked_image_latents=masked, strength=strength or 1.0, height=64, width=64,
              num_inference_steps=8, guidance_scale=7.5, prompt_embeds=cond,
              negative_prompt_embeds=uncond)  # fmt: skip
    lat = ref(**kw, output_type="latent").images.numpy()
    pix = ref(**kw, output_type="np").images
    diff = np.abs(got.latents - lat).max()
    assert diff <= 1e-3, f"final latents differ by {diff}"
    pixels = (pix * 255).round().astype(int)
    inside = np.zeros((64, 64), bool)
    inside[:, 32 if where else 0 :] = True
    assert np.abs(got.images[0][inside].astype(int) - pixels[0][inside]).max() <= 1
    if where:  # outside the mask: the input's own pixels
        assert np.array_equal(got.images[0][~inside], image[~inside])


def test_edits_and_generations_share_a_call_byte_identical(pipe):
    image, mask = _image(3), np.zeros((64, 64), np.uint8)
    mask[20:50, 10:40] = 255
    reqs = [PromptRequest(PROMPT, NEGATIVE, seed=4, guidance=7.5, steps=6, scheduler="ddim",
                          image=image, mask=mask, strength=0.8, height=64, width=64),
            PromptRequest("一个红色的圆", seed=5, guidance=3.0, steps=6, scheduler="ddim",
                          height=64, width=64, batch_size=2)]  # fmt: skip
    together = pipe.generate(reqs)
    for req, res in zip(reqs, together):
        alone = pipe.generate([req])[0]
        assert np.array_equal(alone.images, res.images)


def test_tensorrt_rtx_builds_the_9_channel_unet_from_the_contract(inpaint_model_dir, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="engine builds need tensorrt-rtx-cu13")
    import shutil

    from iap_rt.engines.config import EngineConfig
    from iap_rt.engines.stage import build_engines

    model = tmp_path / "m"
    shutil.copytree(inpaint_model_dir, model, ignore=shutil.ignore_patterns("engines"))
    (plan,) = build_engines(model, EngineConfig(networks="unet"), echo=lambda _: None)
    sidecar = json.loads(plan.with_suffix(".json").read_text())
    assert sidecar["spec_hash"] == spec_hash("sd-inpaint")
    assert sidecar["profile"]["shapes"]["sample"] == [[2, 9, 8, 8]] * 3


def test_generate_cli_inpaints_with_the_inpainting_unet(inpaint_model_dir, tmp_path, capsys):
    from PIL import Image

    from iap_rt.cli import main
    from iap_rt.images import read_params

    image, mask = _image(4), np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    args = ["generate", PROMPT, "--model", str(inpaint_model_dir), "--image",
            str(tmp_path / "in.png"), "--mask", str(tmp_path / "m.png"), "--steps", "4",
            "--backend", "ort", "--no-progress", "--out", str(tmp_path / "out.png")]  # fmt: skip
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert np.array_equal(out[:, :32], image[:, :32])  # kept: the input's own pixels
    assert not np.array_equal(out[:, 32:], image[:, 32:])  # repainted
    assert read_params(tmp_path / "out.png")["inpaint"] is True
