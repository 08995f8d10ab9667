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


def test_serve_faults_drill_smoke(tmp_path):
    """``bench/serve_faults.py`` at a tiny size: a Triton killed and restarted mid-run, no
    request failed once the first second after the kill had passed, the restarted Triton got
    rows again, every process stopped cleanly."""
    out = tmp_path / "faults.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve_faults.py"), "--duration-s", "14",
         "--kill-at-s", "4", "--restart-at-s", "7", "--clients", "2", "--steps", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text("utf-8"))
    res, ev = doc["results"], doc["events"]
    assert res["before_kill"]["answered"] > 0 and res["after_restart"]["answered"] > 0
    assert res["one_triton_up"]["failed"] == 0 and res["one_triton_up"]["answered"] > 0
    assert doc["summary"]["target_zero_failed"] is True
    assert ev["kill_s"] < ev["restart_s"] < ev["back_in_rotation_s"] <= ev["traffic_again_s"]
    assert ev["node_a_exit_code_after_kill"] == 1
    assert doc["config"]["exit_codes_at_end"] == {"a": 0, "b": 0, "gateway": 0}
    for p in res.values():
        assert p["latency_p50_s"] is None or 0 < p["latency_p50_s"] <= p["latency_p99_s"]
