"""Unit-test helpers: run the real CLI in-process (same code path as the console script)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest

from iap_rt.cli import main
from iap_rt.modeldir import default_model_dir


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*args) -> CliResult`` through :func:`iap_rt.cli.main`."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


@pytest.fixture
def model_copy(tmp_path):
    """A writable copy of the embedded default model directory."""
    dst = tmp_path / "model"
    shutil.copytree(default_model_dir(), dst)
    return dst
