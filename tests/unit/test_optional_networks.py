"""Optional networks of the shape contract (the VAE encoder of image editing): a model directory
made before one existed still opens and generates, and is told how to add it; a listed one is
checked against its own declaration; the runtime loads it only when a request needs it."""

import json

import numpy as np
import pytest

from iap_rt.backends.ort import OrtBackend
from iap_rt.errors import ArtifactMismatchError, ArtifactNotFoundError
from iap_rt.modeldir import ModelDir
from iap_rt.pipeline import Pipeline
from iap_rt.specs import CORE_NETWORKS, spec_hash


def _manifest(path):
    return json.loads((path / "manifest.json").read_text("utf-8"))


def _write(path, m):
    (path / "manifest.json").write_text(json.dumps(m), "utf-8")


def test_a_model_without_the_vae_encoder_generates_and_is_told_how_to_add_it(model_copy):
    m = _manifest(model_copy)
    del m["networks"]["vae_encoder"]
    (model_copy / "vae_encoder.onnx").unlink()
    _write(model_copy, m)
    md = ModelDir.open(model_copy)
    assert md.networks == CORE_NETWORKS and not md.has("vae_encoder")
    assert m["spec_hash"] == spec_hash()  # adding the VAE encoder left the core hash as it was
    pipe = Pipeline(md, OrtBackend("cpu", threads=1), progress=False)
    assert pipe("左边有一个红色的圆", steps=2).images.shape == (1, 32, 32, 3)
    with pytest.raises(ArtifactNotFoundError) as e:
        pipe.runner("vae_encoder")
    assert (
        "--networks vae_encoder" in e.value.fix and "without re-exporting the rest" in e.value.fix
    )


def test_a_vae_encoder_made_for_another_contract_is_refused(model_copy):
    m = _manifest(model_copy)
    m["networks"]["vae_encoder"]["spec_hash"] = "0" * 64
    _write(model_copy, m)
    with pytest.raises(ArtifactMismatchError, match="vae_encoder was made for another shape"):
        ModelDir.open(model_copy)
    ModelDir.open(model_copy, networks=CORE_NETWORKS)  # generation alone does not need it


def test_the_vae_encoder_loads_on_first_use_and_inverts_the_toy_decoder(model_copy):
    md = ModelDir.open(model_copy)
    pipe = Pipeline(md, OrtBackend("cpu", threads=1), progress=False)
    assert set(pipe.runners) == set(CORE_NETWORKS)  # generation loads no encoder
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 3, 32, 48)).astype(np.float32)
    out = pipe.runner("vae_encoder").run({"sample": image})
    assert out["latent_mean"].shape == out["latent_std"].shape == (2, 3, 32, 48)
    back = pipe.runners["vae_decoder"].run({"latent_sample": out["latent_mean"]})["image"]
    assert np.abs(back - image).max() < 1e-3  # the toy world's VAE is lossless
    assert "vae_encoder" in pipe.runners
