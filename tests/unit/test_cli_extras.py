"""A command whose extra is not installed, or a plain checkout, stops with one line that names
the fix: no traceback, non-zero exit, before any work."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WITHOUT_TORCH = (
    "import sys\n"
    "sys.modules['torch'] = None  # as on an install without torch: import and find_spec fail\n"
    "from iap_rt.cli import main\n"
    "main(sys.argv[1:])\n"
)


def run_without_torch(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *args],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args, extra",
    [
        (
            ["train", "--base", "sd", "--encoder", "enc", "--data", "d.jsonl", "--out", "run"],
            "train",
        ),
        (["export", "--base", "sd", "--encoder", "enc", "--out", "model"], "export"),
        (["toy", "base", "--data", "data", "--out", "base"], "train"),
        (["toy", "checker", "--out", "checker.safetensors"], "train"),
    ],
)
def test_stage_without_torch_names_the_extra(tmp_path, args, extra):
    r = run_without_torch(tmp_path, *args)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "needs torch" in lines[0] and f"pip install 'iap-rt[{extra}]'" in lines[0]
    assert "torch==2.13.0" in lines[0]  # torch first, pinned
    assert not any(tmp_path.iterdir())  # nothing written


def test_generate_works_without_torch(tmp_path):
    r = run_without_torch(tmp_path, "generate", "左边有一个红色的圆", "--steps", "2", "--out",
                          "a.png", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.png").is_file()


@pytest.mark.parametrize("args", [["train", "--help"], ["export", "--base", "x"], ["engines"]])
def test_plain_checkout_says_to_install(args):
    """From the repository root without `pip install -e .`: the stage folders are not packages,
    so `iap_rt.train` cannot be imported; the CLI says so and how to install."""
    site = sysconfig.get_paths()["purelib"]  # the dependencies, but not the editable finder
    r = subprocess.run(
        [sys.executable, "-S", "-m", "iap_rt.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={"PYTHONPATH": site},
    )  # fmt: skip
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "plain checkout" in r.stderr and "pip install -e '.[all]'" in r.stderr
