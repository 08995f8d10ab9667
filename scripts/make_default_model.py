"""Rebuild the embedded default model directory (iap_rt/data/default_model).

Placeholder until the toy world's trained model replaces it: a tiny *untrained* SD-shaped
model (random seeded weights) exported by the project's own export stage. It draws noise.

    python scripts/make_default_model.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "iap_rt" / "data" / "default_model"


def main() -> int:
    from iap_rt.export.modeldir import export_model_dir
    from iap_rt.train.tiny import make_tiny_encoder, make_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sd = make_tiny_sd(tmp / "sd", seed=0)
        enc = make_tiny_encoder(tmp / "encoder", seed=0)
        out = export_model_dir(sd, enc, tmp / "model", model_id="tiny-untrained")
        if DEST.exists():
            shutil.rmtree(DEST)
        shutil.copytree(out, DEST, ignore=shutil.ignore_patterns(".*"))
    print(f"wrote {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
