"""``bench/serve_load.py`` at a tiny size: both servers start and stop cleanly, every section
of the JSON is there with finite numbers, and nothing failed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_load_smoke(tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--clients", "1,3",
         "--requests-per-client", "2", "--steps", "2", "--max-batch", "4", "--soak-s", "3",
         "--soak-clients", "3", "--ceiling-repeat", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text("utf-8"))
    assert doc["command"].startswith("python bench/serve_load.py --clients 1,3")
    res = doc["results"]
    assert (
        [x["clients"] for x in res["batching"]]
        == [1, 3]
        == [x["clients"] for x in res["no_batching"]]
    )
    for row in res["batching"] + res["no_batching"]:
        assert row["failed"] == 0 and row["images"] == row["requests"] == 2 * row["clients"]
        assert row["images_per_s"] > 0 and 0 < row["latency_p50_s"] <= row["latency_p99_s"]
        assert row["mean_batch"] >= 1
    assert all(r["mean_batch"] == 1 for r in res["no_batching"])  # --max-batch 1: batching off
    assert {1, 4, 16, 32} <= {r["batch"] for r in res["pipeline"]}
    assert all(math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0 for r in res["pipeline"])
    soak = res["soak"]
    assert soak["failed"] == 0 and soak["requests"] > 0 and soak["rss_start_mb"] > 100
    assert len(soak["rss_samples_mb"]) >= 2
    assert doc["config"]["exit_code_batching"] == 0 == doc["config"]["exit_code_no_batching"]
    assert set(doc["summary"]) >= {"per_clients", "target_soak_zero_failed"}
