"""Model directory checks: each broken directory is refused with the file and the fix."""

import json

import pytest

from iap_rt.backends.ort import OrtBackend
from iap_rt.errors import ArtifactError, ArtifactMismatchError, ArtifactNotFoundError
from iap_rt.modeldir import ModelDir


def test_embedded_default_opens(model_copy):
    md = ModelDir.open(model_copy)
    assert md.dims.cross_attention_dim > 0
    assert {"text_encoder", "unet", "vae_decoder"} <= set(md.manifest["networks"])


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="does not exist") as e:
        ModelDir.open(tmp_path / "nope")
    assert "--model" in e.value.fix


def test_missing_manifest(model_copy):
    (model_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactNotFoundError, match="manifest.json is missing"):
        ModelDir.open(model_copy)


def test_corrupt_manifest(model_copy):
    (model_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        ModelDir.open(model_copy)


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_default_guidance_comes_from_the_manifest_else_sds_7_5(model_copy):
    # the embedded toy model was measured at guidance 3 with DDIM and says so
    md = ModelDir.open(model_copy)
    assert (md.default_guidance, md.default_scheduler) == (3.0, "ddim")
    _edit_manifest(model_copy, lambda m: m.pop("default_guidance"))  # written before 0.3
    assert ModelDir.open(model_copy).default_guidance == 7.5


def test_manifest_from_another_spec(model_copy):
    _edit_manifest(model_copy, lambda m: m.update(spec_hash="0" * 64, spec_version=99))
    with pytest.raises(ArtifactMismatchError, match="another shape contract") as e:
        ModelDir.open(model_copy)
    assert "iap-rt export" in e.value.fix


def test_missing_network_file(model_copy):
    (model_copy / "unet.onnx").unlink()
    with pytest.raises(ArtifactNotFoundError, match=r"unet\.onnx is missing"):
        ModelDir.open(model_copy)


def test_truncated_network_file(model_copy):
    p = model_copy / "vae_decoder.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ArtifactMismatchError, match="truncated"):
        ModelDir.open(model_copy)


def test_wrong_precision_is_refused_at_load(model_copy):
    # the manifest claims fp16 but the file is an fp32 graph
    _edit_manifest(model_copy, lambda m: m["networks"]["unet"].update(precision="fp16"))
    md = ModelDir.open(model_copy)
    with pytest.raises(ArtifactMismatchError, match="fp16 shape contract") as e:
        OrtBackend(device="cpu", threads=1).load(md)
    assert "unet.onnx" in str(e.value)


def test_unknown_precision(model_copy):
    _edit_manifest(model_copy, lambda m: m["networks"]["unet"].update(precision="int3"))
    with pytest.raises(ArtifactMismatchError, match="precision 'int3'"):
        ModelDir.open(model_copy)


def test_an_architecture_this_iap_rt_does_not_know_is_refused_with_the_upgrade(model_copy):
    m = json.loads((model_copy / "manifest.json").read_text("utf-8"))
    m["architecture"] = "sd-future"
    (model_copy / "manifest.json").write_text(json.dumps(m), "utf-8")
    with pytest.raises(ArtifactMismatchError, match="architecture 'sd-future'") as e:
        ModelDir.open(model_copy)
    assert "pip install -U iap-rt" in e.value.fix
