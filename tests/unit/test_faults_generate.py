"""Issue 16, `iap-rt generate`: every bad number, conflict and output path is one clear error
before any work, and output paths mean what they say (real CLI, real ONNX Runtime, real files)."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from iap_rt.images import read_params

SMALL = ("--height", "32", "--width", "32", "--steps", "2", "--no-progress")


def _fails(r, *needles, code=None):
    assert r.code != 0, r.out
    if code is not None:
        assert r.code == code, (r.code, r.err)
    # the model's notice on a prompt outside what it knows ("note: ...") may precede the error
    lines = [x for x in r.err.splitlines() if x.strip() and not x.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---- rule 1: numbers are finite and in range --------------------------------------------------


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("nan", "--guidance nan is not a finite number"),
        ("inf", "--guidance inf is not a finite number"),
        ("-inf", "--guidance -inf is not a finite number"),
        ("1e30", "guidance must be a number from 0 to 100, got 1e+30"),
        ("100.5", "guidance must be a number from 0 to 100, got 100.5"),
        ("-0.5", "guidance must be a number from 0 to 100, got -0.5"),
    ],
)
def test_guidance_that_is_not_a_finite_number_in_range_is_refused(tmp_path, run_cli, value, needle):
    out = tmp_path / "o"
    r = run_cli("generate", "山水画", *SMALL, "--guidance", value, "--out", str(out))
    _fails(r, needle, code=2)
    assert not out.exists() or not any(out.iterdir())


def test_guidance_nan_in_the_workspace_file_is_refused(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "iap-rt.toml").write_text("[generate]\nguidance = nan\n")
    _fails(run_cli("generate", "山水画", *SMALL), "guidance = nan is not a finite number")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--seed", str(2**63 - 1), "--batch-size", "2"), "would use seed 9223372036854775808"),
        (("--seed", str(2**63)), "seed must be an integer from 0 to 2**63-1"),
        (("--seed", "-1"), "seed must be an integer from 0 to 2**63-1"),
        (("--steps", "1001"), "steps must be an integer from 1 to 1000"),
        (("--height", "0"), "height must be a positive multiple of 16"),
        (("--width", "-16"), "width must be a positive multiple of 16"),
        (("--chunk-size", "0"), "chunk size must be an integer >= 1"),
        (("--memory-limit", "lots"), "memory limit 'lots' is not a size"),
    ],
)
def test_numbers_out_of_range(tmp_path, run_cli, args, needle):
    out = tmp_path / "o"
    _fails(run_cli("generate", "山水画", *SMALL, *args, "--out", str(out)), needle, code=2)
    assert not out.exists() or not any(out.iterdir())


def test_the_last_seed_that_fits_is_accepted(tmp_path, run_cli):
    seed = 2**63 - 2
    r = run_cli("generate", "山水画", *SMALL, "--seed", str(seed), "--batch-size", "2",
                "--out", str(tmp_path / "o"), "--json")  # fmt: skip
    assert r.code == 0, r.err
    assert [json.loads(x)["seed"] for x in r.out.splitlines()] == [seed, seed + 1]


# ---- rule 2: memory guard and chunks ----------------------------------------------------------


def test_a_huge_width_is_refused_with_the_estimate_and_the_fix(tmp_path, run_cli):
    out = tmp_path / "o"
    r = run_cli("generate", "山水画", "--width", "100000", "--steps", "2", "--out", str(out))
    line = _fails(r, "this call needs an estimated", "TB of RAM", "--memory-limit", code=2)
    assert "UNet activations" in line and "attention scores" in line
    assert "--height" in line and "--width" in line  # the size that fits
    assert not out.exists()


def test_an_explicit_memory_limit_refuses_before_any_file(tmp_path, run_cli):
    out = tmp_path / "o"
    r = run_cli("generate", "山水画", *SMALL, "--memory-limit", "1MB", "--out", str(out))
    _fails(r, "more than the limit of 1.0 MB (--memory-limit)")
    assert not out.exists()
    r = run_cli("generate", "山水画", *SMALL, "--memory-limit", "off", "--out", str(out / "a.png"))
    assert r.code == 0, r.err


def test_chunk_size_and_memory_limit_from_the_workspace_file(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "iap-rt.toml").write_text('[generate]\nchunk_size = 0\nmemory_limit = "4GB"\n')
    _fails(run_cli("generate", "x", *SMALL), "chunk size must be an integer >= 1")
    (tmp_path / "iap-rt.toml").write_text('[generate]\nchunk_size = 2\nmemory_limit = "1kB"\n')
    _fails(run_cli("generate", "x", *SMALL), "limit of 1 kB")


def test_a_large_batch_is_written_chunk_by_chunk(tmp_path, run_cli, monkeypatch):
    """--batch-size N runs as calls of --chunk-size images; each image equals its seed alone."""
    from iap_rt.pipeline import Pipeline

    calls = []
    real = Pipeline.generate

    def spy(self, requests, **kw):
        calls.extend([(r.seed, r.batch_size) for r in requests])
        return real(self, requests, **kw)

    monkeypatch.setattr(Pipeline, "generate", spy)
    out = tmp_path / "o"
    r = run_cli("generate", "山水画", *SMALL, "--batch-size", "5", "--chunk-size", "2",
                "--seed", "10", "--out", str(out), "--json")  # fmt: skip
    assert r.code == 0, r.err
    assert calls == [(10, 2), (12, 2), (14, 1)]
    assert [json.loads(x)["seed"] for x in r.out.splitlines()] == [10, 11, 12, 13, 14]
    alone = tmp_path / "alone.png"
    assert run_cli("generate", "山水画", *SMALL, "--seed", "13", "--out", str(alone)).code == 0
    assert np.array_equal(np.asarray(Image.open(out / "00003.png")), np.asarray(Image.open(alone)))


# ---- rule 4: output paths ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"), [("a.jpg", "JPEG"), ("b.JPEG", "JPEG"), ("c.webp", "WEBP")]
)
def test_an_image_suffix_is_that_file_in_that_format(tmp_path, run_cli, name, fmt):
    out = tmp_path / name
    r = run_cli("generate", "山水画", *SMALL, "--seed", "3", "--out", str(out))
    assert r.code == 0, r.err
    assert out.is_file()  # not a directory holding 00000.png
    with Image.open(out) as im:
        assert im.format == fmt and im.size == (32, 32)
    p = read_params(out)  # carried in an XMP packet
    assert p["prompt"] == "山水画" and p["seed"] == 3 and p["steps"] == 2
    assert [x.name for x in tmp_path.iterdir()] == [name]  # atomic: no temp file left


def test_webp_is_lossless_and_png_carries_the_same_pixels(tmp_path, run_cli):
    a, b = tmp_path / "a.png", tmp_path / "a.webp"
    for out in (a, b):
        assert run_cli("generate", "山水画", *SMALL, "--seed", "4", "--out", str(out)).code == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize("name", ["image.gif", "x.txt", "run.v2"])
def test_an_unknown_suffix_is_an_error(tmp_path, run_cli, name):
    r = run_cli("generate", "山水画", *SMALL, "--out", str(tmp_path / name))
    _fails(r, f"unknown image suffix '.{name.rsplit('.', 1)[1]}'", ".png, .jpg, .jpeg or .webp")
    assert not any(tmp_path.iterdir())


def test_directories_get_numbered_files(tmp_path, run_cli):
    for target in (tmp_path / "plain", str(tmp_path / "run.v2") + "/"):
        r = run_cli("generate", "山水画", *SMALL, "--batch-size", "2", "--out", str(target))
        assert r.code == 0, r.err
    assert sorted(p.name for p in (tmp_path / "run.v2").iterdir()) == ["00000.png", "00001.png"]
    (tmp_path / "existing.d").mkdir()
    assert run_cli("generate", "x", *SMALL, "--out", str(tmp_path / "existing.d")).code == 0
    assert [p.name for p in (tmp_path / "existing.d").iterdir()] == ["00000.png"]


def test_one_file_for_several_images_is_an_error(tmp_path, run_cli):
    r = run_cli("generate", "x", *SMALL, "--batch-size", "2", "--out", str(tmp_path / "a.jpg"))
    _fails(r, "names one image file but 2 images")


# ---- rule 5: CLI conflicts --------------------------------------------------------------------


def test_prompt_and_prompts_file_together_is_an_error(tmp_path, run_cli):
    pf = tmp_path / "p.txt"
    pf.write_text("一只猫\n", encoding="utf-8")
    out = tmp_path / "o"
    r = run_cli("generate", "A", "--prompts-file", str(pf), *SMALL, "--out", str(out))
    _fails(r, "both a PROMPT and --prompts-file were given", code=2)
    assert not out.exists()


def test_guidance_accepts_numpy_numbers_in_python():
    from iap_rt.modeldir import ModelDir, default_model_dir
    from iap_rt.requests import PromptRequest, resolve

    model = ModelDir.open(default_model_dir())
    assert resolve(model, PromptRequest("x", guidance=np.float32(3.0))).guidance == 3.0
    with pytest.raises(Exception, match="guidance must be a number"):
        resolve(model, PromptRequest("x", guidance=np.float32(math.nan)))


def test_batch_size_10000_checks_one_chunk_and_keeps_what_is_done(tmp_path, run_cli, monkeypatch):
    """The row of the issue: memory is that of one chunk, and images already generated are on
    disk when a later chunk fails (here: stopped after two chunks)."""
    from iap_rt.errors import IapRtError
    from iap_rt.pipeline import Pipeline

    checked, calls = [], []
    real_check, real_call = Pipeline.check_memory, Pipeline.generate

    def check(self, call):
        checked.append(call)
        return real_check(self, call)

    def call(self, requests, **kw):
        if len(calls) == 2:
            raise IapRtError("stopped by the test")
        calls.append(requests[0].seed)
        return real_call(self, requests, **kw)

    monkeypatch.setattr(Pipeline, "check_memory", check)
    monkeypatch.setattr(Pipeline, "generate", call)
    out = tmp_path / "o"
    r = run_cli("generate", "山水画", *SMALL, "--batch-size", "10000", "--out", str(out))
    _fails(r, "stopped by the test")
    assert {c.images for c in checked} == {8} and calls == [0, 8]
    assert len(list(out.glob("*.png"))) == 16
