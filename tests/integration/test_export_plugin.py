"""``iap-rt export --unet``: a fine-tuned UNet folder or a LoRA fused at export, same encoder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from iap_rt.errors import ConfigError
from iap_rt.export.exporter import ort_session
from iap_rt.export.plugin import fuse_lora, read_lora, resolve_unet
from iap_rt.export.stage import export_model_dir
from iap_rt.modeldir import ModelDir


def _unet(path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path, use_safetensors=True).eval()


def _lora_file(unet, path, rank=2, alpha=4.0, seed=0, prefix="unet."):
    """A PEFT-format LoRA on every cross-attention to_k / to_v (what style LoRAs adapt)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g)
            tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(
                m.out_features, rank, generator=g
            )
    tensors["text_encoder.text_model.x.lora_A.weight"] = torch.zeros(rank, 4)
    # what StableDiffusionPipeline.save_lora_weights writes: the UNet's LoraConfig, keys
    # prefixed like the tensors
    conf = {
        "unet.r": rank,
        "unet.lora_alpha": alpha,
        "unet.target_modules": ["attn2.to_k", "attn2.to_v"],
    }
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(conf)}
    save_file(tensors, str(path), metadata=meta)
    return path


def _unet_out(model_dir, unet_file="unet.onnx"):
    md = ModelDir.open(model_dir)
    sess = ort_session(md.path / unet_file)
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((1, 4, 16, 16)).astype(np.float32),
        "timestep": np.array([500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (1, md.dims.text_max_length, md.dims.cross_attention_dim)
        ).astype(np.float32),
    }
    return sess.run(None, feeds)[0], feeds


def _torch_out(unet, feeds):
    with torch.no_grad():
        return unet(*(torch.from_numpy(feeds[k]) for k in feeds)).sample.numpy()


def test_lora_is_fused_like_the_formula_and_like_peft(tiny_sd_dir, tmp_path):
    unet = _unet(tiny_sd_dir / "unet")
    lora = _lora_file(unet, tmp_path / "style.safetensors")
    layers, ignored = read_lora(lora)
    assert len(layers) == 2 * sum(n.endswith("attn2") for n, _ in unet.named_modules())
    assert ignored == ["text_encoder.text_model.x.lora_A.weight"]
    name = next(iter(layers))
    A, B, ratio = layers[name]
    assert ratio == 2.0  # alpha 4 / r 2
    before = dict(unet.named_modules())[name].weight.detach().clone()
    notes = fuse_lora(unet, lora, scale=0.5)
    after = dict(unet.named_modules())[name].weight
    assert torch.allclose(after, before + 0.5 * 2.0 * B @ A, atol=1e-6)
    assert "text-encoder" in notes[-1]
    peft = pytest.importorskip("peft")  # noqa: F841 (diffusers' own loader needs it)
    from diffusers import StableDiffusionPipeline

    # what StableDiffusionPipeline.load_lora_weights does for the UNet
    state, _, meta = StableDiffusionPipeline.lora_state_dict(str(lora), return_lora_metadata=True)
    ref = _unet(tiny_sd_dir / "unet")
    ref.load_lora_adapter(state, prefix="unet", adapter_name="style", metadata=meta)
    assert ref.peft_config["style"].lora_alpha == 4.0
    ref.fuse_lora(lora_scale=0.5)
    ref.unload_lora()
    got = dict(unet.named_parameters())
    for k, v in ref.named_parameters():
        assert torch.allclose(got[k], v, atol=1e-5), k


def test_export_takes_a_finetuned_unet_or_a_lora(tiny_sd_dir, tiny_encoder_dir, tmp_path):
    # a "fine-tune": the base's UNet with every weight nudged, saved as a diffusers folder
    ft = _unet(tiny_sd_dir / "unet")
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ft.save_pretrained(tmp_path / "ft" / "unet", safe_serialization=True)
    out = export_model_dir(tiny_sd_dir, tiny_encoder_dir, tmp_path / "m_ft",
                           unet=tmp_path / "ft")  # fmt: skip
    got, feeds = _unet_out(out)
    assert np.abs(got - _torch_out(ft, feeds)).max() < 1e-4
    assert np.abs(got - _torch_out(_unet(tiny_sd_dir / "unet"), feeds)).max() > 1e-2
    man = ModelDir.open(out).manifest
    assert man["unet_source"]["kind"] == "finetuned"
    # a LoRA, fused at export; re-exporting with another scale redoes the UNet only
    unet = _unet(tiny_sd_dir / "unet")
    lora = _lora_file(unet, tmp_path / "style.safetensors")
    m = tmp_path / "m_lora"
    export_model_dir(tiny_sd_dir, tiny_encoder_dir, m, unet=lora, lora_scale=0.5)
    fuse_lora(unet, lora, scale=0.5)
    got, feeds = _unet_out(m)
    assert np.abs(got - _torch_out(unet, feeds)).max() < 1e-4
    first = ModelDir.open(m).manifest
    assert first["unet_source"]["kind"] == "lora" and first["unet_source"]["lora_scale"] == 0.5
    export_model_dir(tiny_sd_dir, tiny_encoder_dir, m, unet=lora, lora_scale=1.0)
    second = ModelDir.open(m).manifest
    nets = ("unet", "text_encoder", "vae_decoder")
    same = [first["networks"][n]["sha256"] == second["networks"][n]["sha256"] for n in nets]
    assert same == [False, True, True]


def test_unet_that_is_not_a_finetune_is_refused(tiny_sd_dir, tmp_path):
    other = tmp_path / "other" / "unet"
    shutil.copytree(tiny_sd_dir / "unet", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["cross_attention_dim"] = 2 * cfg["cross_attention_dim"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        resolve_unet(tiny_sd_dir, other)
    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_down_blocks_0_x.lora_down.weight": torch.zeros(2, 2)}, str(kohya))
    with pytest.raises(ConfigError, match="kohya"):
        read_lora(resolve_unet(tiny_sd_dir, kohya).lora)
