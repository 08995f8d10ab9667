"""The toy base model: a few training steps write a diffusers directory that loads and samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    from iap_rt.toy.base import BaseConfig, train_base
    from iap_rt.toy.data import write_dataset

    root = tmp_path_factory.mktemp("toybase")
    write_dataset(root / "data", n=64, seed=0, n_test=8)
    cfg = BaseConfig(
        block_out_channels=(8, 16, 16, 16, 16),
        norm_num_groups=8,
        text_width=16,
        text_layers=1,
        text_heads=2,
        attention_heads=2,
        batch_size=4,
        log_every=1,
    )
    out = train_base(root / "data", root / "base", minutes=5, max_steps=3, cfg=cfg, progress=str)
    return out, cfg


def test_base_dir_loads_with_diffusers(toy_base):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out, _ = toy_base
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.unet.config.in_channels == 3 and pipe.vae_scale_factor == 1
    assert isinstance(pipe.scheduler, DDIMScheduler)
    tok = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    ids = tok("a scarlet triangle in the middle").input_ids
    assert len(ids) == 2 + 6  # BOS + one token per word + EOS
    vae = AutoencoderKL.from_pretrained(str(out / "vae"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.sample()).sample
    assert float((rec - x).abs().max()) < 2e-3  # the fixed pixel "VAE" is near lossless
    rec = json.loads((out / "toy_base.json").read_text())
    assert rec["steps"] == 3 and rec["samples_seen"] == 12


def test_resume_continues(toy_base, tmp_path):
    from iap_rt.toy.base import train_base

    out, cfg = toy_base
    train_base(out.parent / "data", out, minutes=5, max_steps=4, cfg=cfg, progress=str)
    assert json.loads((out / "toy_base.json").read_text())["steps"] == 4


def test_eval_runs_on_base(toy_base):
    from iap_rt.toy.evaluate import diffusers_generator, evaluate

    out, _ = toy_base
    gen = diffusers_generator(out, steps=2, batch=4)
    res, images, items = evaluate(
        gen, lang="en", combos=[("red", "circle", "left")], seeds_per_combo=2
    )
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert set(res) >= {"colour", "shape", "position", "all", "n"} and res["n"] == 2
    again = gen([it.prompt for it in items], [it.seed for it in items])
    assert np.array_equal(images, again)  # seeded
