"""bench/verify_cost.py runs (small) and reports what a later start costs: a stat, no hash."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_verify_cost_smoke(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "bench" / "verify_cost.py"), "--gb", "0.02",
           "--dir", str(tmp_path), "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    assert r["bytes"] == 20_000_000
    assert r["later_open_s"] < r["first_open_warm_s"]  # remembered: not hashed again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("verify-cost-")]
