"""`iap-rt generate` end to end on the embedded model (ONNX Runtime, no torch)."""

import json
import os

import pytest
from PIL import Image

from iap_rt.images import read_params
from iap_rt.modeldir import default_model_dir

SMALL = ("--height", "64", "--width", "64", "--steps", "3", "--no-progress")


def test_generates_png_with_parameters(tmp_path, run_cli):
    out = tmp_path / "a.png"
    r = run_cli(
        "generate", "山水画", *SMALL, "--seed", "5", "--negative", "模糊", "--out", str(out)
    )
    assert r.code == 0, r.err
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    p = read_params(out)
    assert p["prompt"] == "山水画" and p["negative_prompt"] == "模糊" and p["seed"] == 5
    assert p["steps"] == 3 and p["backend"].startswith("ort") and p["model_id"]
    # no --guidance / --scheduler: the embedded model's own defaults (what it was measured at)
    assert (p["guidance"], p["scheduler"]) == (3.0, "ddim")


def test_seeded_output_is_byte_identical(tmp_path, run_cli):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        assert run_cli("generate", "一只猫", *SMALL, "--seed", "3", "--out", str(out)).code == 0
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.png"
    assert run_cli("generate", "一只猫", *SMALL, "--seed", "4", "--out", str(c)).code == 0
    assert c.read_bytes() != a.read_bytes()


def test_prompts_file_batch_and_json(tmp_path, run_cli):
    pf = tmp_path / "p.txt"
    pf.write_text("山水画\n\n一只猫\n", encoding="utf-8")
    out = tmp_path / "outs"
    r = run_cli(
        "generate",
        "--prompts-file",
        str(pf),
        "--batch-size",
        "2",
        *SMALL,
        "--json",
        "--out",
        str(out),
    )
    assert r.code == 0, r.err
    lines = [json.loads(x) for x in r.out.splitlines()]
    assert [(x["prompt"], x["seed"]) for x in lines] == [
        ("山水画", 0),
        ("山水画", 1),
        ("一只猫", 0),
        ("一只猫", 1),
    ]
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    # a second run never overwrites earlier images
    assert run_cli("generate", "x", *SMALL, "--out", str(out), "--json").code == 0
    assert len(list(out.glob("*.png"))) == 5


def test_workspace_config_is_used(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "iap-rt.toml").write_text(
        '[generate]\nsteps = 2\nheight = 64\nwidth = 64\nseed = 9\nout = "ws.png"\n'
    )
    r = run_cli("generate", "山水画", "--no-progress")
    assert r.code == 0, r.err
    p = read_params(tmp_path / "ws.png")
    assert p["steps"] == 2 and p["seed"] == 9
    (tmp_path / "iap-rt.toml").write_text('[generate]\nsteps = 2\nguidance = 5.5\nout = "g.png"\n')
    assert run_cli("generate", "山水画", "--no-progress").code == 0
    assert read_params(tmp_path / "g.png")["guidance"] == 5.5  # the file beats the model
    assert run_cli("generate", "山水画", "--no-progress", "--guidance", "0").code == 0
    assert read_params(tmp_path / "g.png")["guidance"] == 0.0  # the option beats the file


def _assert_fails(r, *needles):
    assert r.code != 0
    lines = [x for x in r.err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--scheduler", "plms"), ("unknown scheduler 'plms'", "ddim")),
        (("--backend", "cuda"), ("unknown backend 'cuda'", "ort")),
        (("--height", "63"), ("height must be a positive multiple of", "got 63")),
        (("--steps", "0"), ("steps must be an integer from 1 to 1000, got 0",)),
        (("--guidance", "-1"), ("guidance must be a number from 0 to 100",)),
        (("--batch-size", "0"), ("batch size must be an integer >= 1",)),
    ],
)
def test_bad_generation_inputs(tmp_path, run_cli, args, needles):
    out = tmp_path / "o"
    r = run_cli("generate", "山水画", "--height", "64", "--width", "64", *args, "--out", str(out))
    _assert_fails(r, *needles)
    assert not out.exists() or not any(out.iterdir())


def test_missing_and_corrupt_model_dir(tmp_path, run_cli, model_copy):
    out = tmp_path / "o"
    _assert_fails(
        run_cli("generate", "x", "--model", str(tmp_path / "none"), "--out", str(out)),
        "does not exist",
    )
    (model_copy / "manifest.json").write_text("garbage")
    _assert_fails(
        run_cli("generate", "x", "--model", str(model_copy), "--out", str(out)), "corrupt"
    )
    assert not out.exists()


def test_manifest_from_other_spec(tmp_path, run_cli, model_copy):
    m = json.loads((model_copy / "manifest.json").read_text())
    m["spec_hash"] = "f" * 64
    (model_copy / "manifest.json").write_text(json.dumps(m))
    _assert_fails(
        run_cli("generate", "x", "--model", str(model_copy), "--out", str(tmp_path / "o")),
        "another shape contract",
        "iap-rt export",
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_dir(tmp_path, run_cli):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    _assert_fails(
        run_cli("generate", "x", *SMALL, "--out", str(ro / "sub")), "cannot create directory"
    )


def test_output_dir_that_cannot_be_created(tmp_path, run_cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _assert_fails(
        run_cli("generate", "x", *SMALL, "--out", str(blocker / "sub")), "cannot create directory"
    )
    _assert_fails(run_cli("generate", "x", *SMALL, "--out", str(blocker)), "exists and is a file")
    assert blocker.read_text() == "x"


def test_output_dir_not_writable_via_chmod(tmp_path, run_cli, monkeypatch):
    # works as root too: os.access is what iap-rt consults before generating
    d = tmp_path / "d"
    d.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    _assert_fails(run_cli("generate", "x", *SMALL, "--out", str(d)), "is not writable")
    assert not any(d.iterdir())


def test_bad_prompts_files(tmp_path, run_cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _assert_fails(
        run_cli("generate", "--prompts-file", str(empty), *SMALL, "--out", str(tmp_path / "o")),
        "is empty",
    )
    latin = tmp_path / "latin.txt"
    latin.write_bytes("山水画".encode("gbk"))
    _assert_fails(
        run_cli("generate", "--prompts-file", str(latin), *SMALL, "--out", str(tmp_path / "o")),
        "not UTF-8",
    )
    _assert_fails(run_cli("generate", *SMALL, "--out", str(tmp_path / "o")), "no prompt given")
    assert not (tmp_path / "o").exists()


def test_info_is_a_summary_and_json_holds_the_manifest(run_cli):
    r = run_cli("info")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert len(lines) <= 25, r.out  # one screen
    assert "CPUExecutionProvider" in r.out and "TensorRT" in r.out
    for words in (
        "model: toy2-zh-pivot",
        "native size: 32x32",
        "networks: text_encoder fp32",
        "integrity: 4 network file(s) match",
        "engines: none",
        "sampling defaults: ddim, guidance 3, 25 steps",
        "knows: one or two coloured",
    ):
        assert words in r.out, words  # fmt: skip
    r = run_cli("info", "--json")
    doc = json.loads(r.out)
    manifest = json.loads((default_model_dir() / "manifest.json").read_text("utf-8"))
    assert doc["model"]["manifest"] == manifest and doc["model"]["integrity"]["ok"]
    assert doc["model"]["defaults"]["guidance"] == 3.0 and "onnxruntime" in doc


def test_default_size_comes_from_the_manifest(tmp_path, run_cli, model_copy):
    m = json.loads((model_copy / "manifest.json").read_text())
    m["image_size"] = 48
    (model_copy / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "d.png"
    r = run_cli("generate", "山水画", "--model", str(model_copy), "--steps", "2", "--out", str(out))
    assert r.code == 0, r.err
    with Image.open(out) as im:
        assert im.size == (48, 48)


def test_height_must_suit_the_unet_downsampling_not_only_the_vae(tmp_path, run_cli):
    from iap_rt.modeldir import ModelDir, default_model_dir

    dims = ModelDir.open(default_model_dir()).dims
    m = dims.pixel_multiple
    assert m == dims.vae_scale_factor * dims.latent_multiple and dims.latent_multiple > 1
    bad = m + dims.vae_scale_factor  # a multiple of the VAE factor only
    r = run_cli("generate", "山水画", "--height", str(bad), "--out", str(tmp_path / "o"))
    _assert_fails(r, f"height must be a positive multiple of {m}, got {bad}")
    assert not (tmp_path / "o").exists()


def test_json_lines_carry_the_timings_of_their_call(tmp_path, run_cli):
    """--json: each image line has its call's timings; opening the model (integrity check)
    and creating the sessions are reported as such, once, not inside the text encoder."""
    r = run_cli("generate", "红圆", "--batch-size", "3", "--chunk-size", "2", "--steps", "3",
                "--out", str(tmp_path / "o"), "--json")  # fmt: skip
    assert r.code == 0, r.err
    lines = [json.loads(x) for x in r.out.splitlines()]
    first, last = lines[0]["timings"], lines[2]["timings"]
    assert lines[1]["timings"] == first  # the same call
    assert first["open_s"] > 0 and first["load_s"] > 0 and first["unet_steps"] == 3
    assert last["open_s"] == 0 and last["load_s"] == 0  # sessions already there
    for t in (first, last):
        assert 0 < t["unet_s"] <= t["loop_s"] <= t["total_s"] and t["text_encoder_s"] >= 0
