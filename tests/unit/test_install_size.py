"""The runtime install stays light (issue 27.8): what ``pip install '.[cpu]'`` puts under
``iap_rt/`` (the Python files of the package and its stage folders, and the package data) is at
most 28 MB. Measured on the source tree: the files setuptools installs, before byte-compiling
(measured installed: 25 MB, bytecode included)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 28e6


def test_the_runtime_install_is_at_most_28_mb():
    files = [p for d in ("iap_rt", "train", "export", "engines") for p in (ROOT / d).rglob("*.py")]
    files += [p for p in (ROOT / "iap_rt" / "data").rglob("*") if p.is_file()]
    files += [p for p in (ROOT / "iap_rt" / "serve" / "web").iterdir() if p.is_file()]
    total = sum(p.stat().st_size for p in files if "__pycache__" not in p.parts)
    assert total <= LIMIT - 3e6, f"{total / 1e6:.1f} MB (+ ~3 MB of bytecode) > 28 MB"
