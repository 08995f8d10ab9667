"""Benchmark: what the model integrity check costs at SD 1.5 size.

    python bench/verify_cost.py [--gb 1.72] [--dir DIR] [--out bench/results/verify_cost.json]

Copies the embedded model to ``DIR`` (default: a temporary directory beside the user cache)
and gives its UNet an external-data file of ``--gb`` GB of random bytes (1.72 GB: the SD 1.5
fp16 UNet's weights), recorded in the manifest like an export would. Then times
``ModelDir.open`` (which verifies every network file against the manifest's sha256):

- ``first_open_cold_s``: first open, the file's pages evicted from the page cache
  (``posix_fadvise(DONTNEED)``): read from disk + hashed;
- ``first_open_warm_s``: first open (verification record removed), file in the page cache;
- ``later_open_s``: every later open: the stamp matches the record, nothing is hashed;
- ``sha256_gb_per_s`` / ``sha256_cpu_gb_per_s``: the hash alone, warm, per wall-clock second
  and per CPU second (the latter does not depend on how busy the machine is).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _evict(path: Path) -> bool:
    """Drop ``path``'s pages from the page cache (no root needed); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.72)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "verify_cost.json")
    args = ap.parse_args()

    from iap_rt.fileio import sha256_file
    from iap_rt.modeldir import ModelDir, default_model_dir, verified_record_path

    work = Path(tempfile.mkdtemp(prefix="verify-cost-", dir=args.dir))
    os.environ["IAP_RT_CACHE_DIR"] = str(work / "cache")
    try:
        model = work / "model"
        shutil.copytree(default_model_dir(), model)
        data = model / "unet.onnx.data"
        n, h, chunk = int(args.gb * 1e9), hashlib.sha256(), 64 << 20
        with open(data, "wb") as f:
            left = n
            while left:
                block = os.urandom(min(chunk, left))
                h.update(block)
                f.write(block)
                left -= len(block)
        manifest = json.loads((model / "manifest.json").read_text("utf-8"))
        unet = manifest["networks"]["unet"]
        unet.update(external_data=data.name, data_bytes=n, data_sha256=h.hexdigest())
        (model / "manifest.json").write_text(json.dumps(manifest), "utf-8")

        evicted = _evict(data)
        cold = _timed(lambda: ModelDir.open(model))
        later = [_timed(lambda: ModelDir.open(model)) for _ in range(5)]
        verified_record_path(model).unlink()
        warm = _timed(lambda: ModelDir.open(model))
        c0 = time.process_time()
        hash_s = _timed(lambda: sha256_file(data))
        hash_cpu = time.process_time() - c0
        result = {
            "bytes": n,
            "first_open_cold_s": round(cold, 3),
            "page_cache_evicted": evicted,
            "first_open_warm_s": round(warm, 3),
            "later_open_s": round(min(later), 4),
            "sha256_gb_per_s": round(n / 1e9 / hash_s, 2),
            "sha256_cpu_gb_per_s": round(n / 1e9 / max(hash_cpu, 1e-9), 2),
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
                "python": sys.version.split()[0],
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
