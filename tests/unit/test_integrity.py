"""Issue 16, rule 3: a network whose bytes differ from the manifest is refused before any
inference, naming the file and the re-export command; a verified file is hashed once and
remembered by (size, mtime_ns, ctime_ns, inode, device) in the user's cache."""

import json
import os
import shutil

import pytest

from iap_rt.errors import ArtifactMismatchError
from iap_rt.modeldir import ModelDir, default_model_dir, verified_record_path

SMALL = ("--height", "32", "--width", "32", "--steps", "2", "--no-progress")


def _overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_200kb_of_unet_weights_overwritten_is_refused_before_inference(
    tmp_path, run_cli, model_copy, monkeypatch
):
    unet = model_copy / "unet.onnx"
    size = unet.stat().st_size
    ModelDir.open(model_copy)  # verified once, remembered
    _overwrite(unet, size // 2, os.urandom(200_000))  # same size: the old size check passes
    assert unet.stat().st_size == size

    from iap_rt.backends.ort import OrtBackend

    loaded = []
    monkeypatch.setattr(OrtBackend, "load", lambda self, m: loaded.append(m) or {})
    out = tmp_path / "o"
    r = run_cli("generate", "山水画", *SMALL, "--model", str(model_copy), "--out", str(out))
    assert r.code != 0 and not loaded  # no session was ever created
    line = r.err.strip()
    assert line.startswith("error:") and "\n" not in line
    assert f"{unet} differs from what the export recorded" in line
    assert "unet network was modified or damaged" in line and "iap-rt export" in line
    assert not out.exists()


def test_random_bytes_of_the_same_size_are_caught_by_the_hash_not_onnx_runtime(model_copy):
    unet = model_copy / "unet.onnx"
    unet.write_bytes(os.urandom(unet.stat().st_size))
    with pytest.raises(ArtifactMismatchError, match="unet.onnx differs from what the export"):
        ModelDir.open(model_copy)


def test_each_network_file_is_checked(model_copy):
    for name in ("text_encoder.onnx", "vae_decoder.onnx"):
        m = model_copy.parent / f"m-{name}"
        shutil.copytree(model_copy, m)
        _overwrite(m / name, 100, b"\0" * 64)
        with pytest.raises(ArtifactMismatchError, match=name.split(".")[0]):
            ModelDir.open(m)


def test_verified_once_then_remembered_and_any_change_rehashes(model_copy):
    md = ModelDir.open(model_copy, verify=False)
    assert sorted(md.verify()) == [
        "text_encoder.onnx",
        "unet.onnx",
        "vae_decoder.onnx",
        "vae_encoder.onnx",
    ]
    assert md.verify() == []  # stamps unchanged: nothing hashed
    record = json.loads(verified_record_path(model_copy).read_text())
    assert record["model"] == str(model_copy.resolve())
    assert set(record["files"]) == {
        "text_encoder.onnx",
        "unet.onnx",
        "vae_decoder.onnx",
        "vae_encoder.onnx",
    }

    # restoring mtime after a write is not enough to skip the hash: ctime moves anyway
    unet = model_copy / "unet.onnx"
    st = unet.stat()
    original = unet.read_bytes()
    _overwrite(unet, 1000, b"\xff" * 16)
    os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert unet.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ArtifactMismatchError):
        md.verify()
    # put the bytes back: verified again (hashed), then remembered again
    unet.write_bytes(original)
    assert md.verify() == ["unet.onnx"]
    assert md.verify() == []


def test_a_replaced_file_with_the_same_bytes_is_hashed_again(model_copy):
    md = ModelDir.open(model_copy)
    unet = model_copy / "unet.onnx"
    tmp = model_copy / "unet.copy"
    shutil.copy2(unet, tmp)
    os.replace(tmp, unet)  # new inode, same bytes and mtime
    assert md.verify() == ["unet.onnx"]


def test_the_record_lives_in_the_cache_not_beside_the_model(model_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("IAP_RT_CACHE_DIR", str(tmp_path / "cache"))
    before = sorted(p.name for p in model_copy.iterdir())
    ModelDir.open(model_copy)
    assert sorted(p.name for p in model_copy.iterdir()) == before
    assert verified_record_path(model_copy).is_relative_to(tmp_path / "cache")


def test_an_unwritable_cache_only_costs_a_rehash(model_copy, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("IAP_RT_CACHE_DIR", str(blocker))
    md = ModelDir.open(model_copy)  # verified, but cannot remember it
    assert "cannot remember the verified model files" in caplog.text
    assert len(md.verify()) == 4


def test_the_embedded_model_verifies(tmp_path, monkeypatch):
    monkeypatch.setenv("IAP_RT_CACHE_DIR", str(tmp_path))
    md = ModelDir.open(default_model_dir())
    assert md.verify() == []  # remembered by the open above
    assert md.reexport_fix(["unet"]).startswith("reinstall iap-rt")


def test_info_reports_a_damaged_file(run_cli, model_copy):
    _overwrite(model_copy / "vae_decoder.onnx", 200, b"\x01" * 8)
    r = run_cli("info", "--model", str(model_copy))
    assert r.code == 0, r.err
    assert "integrity: FAILED:" in r.out and "vae_decoder.onnx differs" in r.out


def test_info_reports_integrity(run_cli, model_copy):
    r = run_cli("info", "--model", str(model_copy))
    assert "integrity: 4 network file(s) match the manifest (hashed 4 now)" in r.out
    r = run_cli("info", "--model", str(model_copy))
    assert "integrity: 4 network file(s) match the manifest (unchanged since verified)" in r.out


def test_a_listed_external_data_file_that_is_missing_is_named(model_copy):
    m = json.loads((model_copy / "manifest.json").read_text())
    m["networks"]["unet"].update(external_data="unet.onnx.data", data_sha256="a" * 64)
    (model_copy / "manifest.json").write_text(json.dumps(m))
    from iap_rt.errors import ArtifactNotFoundError

    with pytest.raises(ArtifactNotFoundError, match="unet.onnx.data is missing"):
        ModelDir.open(model_copy)
