"""The shape contract: declarations and everything derived from them."""

import numpy as np
import pytest

from iap_rt.errors import ShapeContractError
from iap_rt.specs import NETWORKS, TEXT_ENCODER, UNET, VAE_DECODER, ModelDims, spec_hash

DIMS = ModelDims(text_max_length=77, cross_attention_dim=768)


def test_names_follow_diffusers_and_outputs_are_distinct():
    assert UNET.input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert TEXT_ENCODER.input_names == ["input_ids", "attention_mask"]
    outs = [o for n in NETWORKS.values() for o in n.output_names]
    ins = [i for n in NETWORKS.values() for i in n.input_names]
    assert len(set(outs)) == len(outs) and not set(outs) & set(ins)


def test_dynamic_axes_derived_from_symbols():
    assert UNET.dynamic_axes() == {
        "sample": {0: "N", 2: "h", 3: "w"},
        "timestep": {0: "N"},
        "encoder_hidden_states": {0: "N"},
        "noise_pred": {0: "N", 2: "h", 3: "w"},
    }
    assert VAE_DECODER.dynamic_axes()["image"] == {0: "B", 2: "H", 3: "W"}


def test_shapes_and_profile():
    v = {"N": 2, "B": 1, "h": 64, "w": 48}
    shapes = VAE_DECODER.shapes(DIMS, v)
    assert shapes == {"latent_sample": (1, 4, 64, 48), "image": (1, 3, 512, 384)}
    prof = UNET.profile(
        DIMS, {"N": 1, "h": 32, "w": 32}, {"N": 2, "h": 64, "w": 64}, {"N": 8, "h": 96, "w": 96}
    )
    assert prof["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 96, 96))
    assert prof["encoder_hidden_states"][2] == (8, 77, 768)
    assert prof["timestep"][0] == (1,)


def test_dummy_inputs_follow_precision():
    f = UNET.dummy_inputs(DIMS, "fp16", {"N": 2, "h": 8, "w": 8})
    assert f["sample"].dtype == np.float16 and f["timestep"].dtype == np.float32
    assert f["encoder_hidden_states"].shape == (2, 77, 768)
    t = TEXT_ENCODER.dummy_inputs(DIMS, "fp32", {"N": 3}, vocab_size=50)
    assert t["input_ids"].dtype == np.int64 and t["input_ids"].max() < 50
    UNET.check_feeds(f, DIMS, "fp16")  # what we derive passes our own check


def test_check_feeds_lists_every_problem():
    feeds = UNET.dummy_inputs(DIMS, "fp32", {"N": 2, "h": 8, "w": 8})
    feeds["timestep"] = feeds["timestep"][:1]  # N disagrees
    feeds["encoder_hidden_states"] = feeds["encoder_hidden_states"][:, :, :32]  # D wrong
    feeds["sample"] = feeds["sample"].astype(np.float16)  # dtype wrong
    with pytest.raises(ShapeContractError) as e:
        UNET.check_feeds(feeds, DIMS, "fp32")
    msg = str(e.value)
    assert "dtype float16, expected float32" in msg
    assert "axis D=32, expected 768" in msg
    assert "disagrees with N=2" in msg


def test_check_feeds_missing_and_rank():
    with pytest.raises(ShapeContractError, match=r"missing input\(s\) \['attention_mask'\]"):
        TEXT_ENCODER.check_feeds({"input_ids": np.zeros((1, 77), np.int64)}, DIMS, "fp32")
    with pytest.raises(ShapeContractError, match="rank 3"):
        VAE_DECODER.check_feeds({"latent_sample": np.zeros((4, 8, 8), np.float32)}, DIMS, "fp32")


def test_spec_hash_is_stable_and_sensitive(monkeypatch):
    h = spec_hash()
    assert h == spec_hash() and len(h) == 64
    import iap_rt.specs as specs

    monkeypatch.setattr(specs, "SPEC_VERSION", specs.SPEC_VERSION + 1)
    assert specs.spec_hash() != h


def test_the_inpainting_architecture_declares_a_9_channel_unet_and_its_own_hash():
    from iap_rt.specs import UNET_INPAINT, network_specs

    nets = network_specs("sd-inpaint")
    assert nets["unet"] is UNET_INPAINT and nets["text_encoder"] is TEXT_ENCODER
    assert network_specs() is NETWORKS
    f = UNET_INPAINT.dummy_inputs(DIMS, "fp32", {"N": 2, "h": 8, "w": 8})
    assert f["sample"].shape == (2, 9, 8, 8)  # latents, mask, masked-image latents
    assert UNET_INPAINT.shapes(DIMS, {"N": 2, "h": 8, "w": 8})["noise_pred"] == (2, 4, 8, 8)
    UNET_INPAINT.check_feeds(f, DIMS, "fp32")
    with pytest.raises(ShapeContractError, match="axis I=4, expected 9"):
        UNET_INPAINT.check_feeds(UNET.dummy_inputs(DIMS, "fp32", {"N": 2, "h": 8, "w": 8}),
                                 DIMS, "fp32")  # fmt: skip
    # SD keeps the hash it had before there were architectures; sd-inpaint has its own
    assert spec_hash() == spec_hash("sd") != spec_hash("sd-inpaint")
    with pytest.raises(ShapeContractError, match="unknown architecture 'sdxl'"):
        spec_hash("sdxl")
