"""The built wheel carries the project's licence, the shipped data's own licence notes, and
every package (the stage folders install as subpackages of iap_rt)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_licences_and_every_package(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("iap_rt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    licence = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    text = zipfile.ZipFile(wheel).read(licence).decode()
    assert "Apache License" in text and "Version 2.0" in text
    assert "iap_rt/data/vocab/README.md" in names  # provenance + licences of the vocabularies
    # every package folder of the checkout (the stage folders install under iap_rt/)
    folders = {"iap_rt": "iap_rt", "train": "iap_rt/train", "export": "iap_rt/export",
               "engines": "iap_rt/engines"}  # fmt: skip
    for folder, target in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            assert f"{target}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    assert "iap_rt/data/default_model/manifest.json" in names
    for asset in ("index.html", "app.js", "style.css"):  # the web page of `iap-rt serve`
        assert f"iap_rt/serve/web/{asset}" in names, asset
