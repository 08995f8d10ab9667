"""``bench/peers.py`` and ``bench/vae_gap.py`` at tiny size (issue 31): the iap-rt and diffusers
parts always; the optimum part only where ``IAP_RT_OPTIMUM_PYTHON`` names an interpreter with
optimum-onnx (its own venv: it pins transformers 4.57). Checks are on the JSON's layout and on
what ran, never on timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
OPTIMUM = os.environ.get("IAP_RT_OPTIMUM_PYTHON")
NEEDS_OPTIMUM = pytest.mark.skipif(
    not OPTIMUM,
    reason="IAP_RT_OPTIMUM_PYTHON is not set (a python with optimum-onnx 0.1.0 in its own venv, "
    "e.g. /work/venv-optimum/bin/python): the optimum part of bench/peers.py is not run",
)
TINY = ("--arch", "tiny", "--steps", "2", "--runs", "1", "--size", "64", "--threads", "1")


def run_script(name: str, *args: str, optimum: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "IAP_RT_OPTIMUM_PYTHON"}
    env["OMP_NUM_THREADS"] = "1"
    if optimum:
        env["IAP_RT_OPTIMUM_PYTHON"] = optimum
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, timeout=1200, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the tiny sources and each tool's export are made once."""
    return tmp_path_factory.mktemp("peers-cache")


def check_run(row: dict, tool: str) -> None:
    assert row["status"] == "ok", row
    assert row["tool"] == tool and len(row["images"]) == 2
    assert all(im["unet_steps"] == 2 for im in row["images"])
    for key in ("e2e_s", "unet_step_s", "vae_decode_s", "vae_decode_first_s", "cold_start_s"):
        assert row[key] > 0, key
    assert row["peak_rss_mb"] > 50 and row["text_encoder_s"] >= 0
    assert row["cold_start_s"] == row["images"][0]["at_s"] <= row["wall_s"]


def test_peers_iaprt_and_diffusers_without_optimum(cache, tmp_path):
    """All three tools asked for, no optimum interpreter: optimum is skipped with the reason,
    iap-rt and diffusers run on the same tiny weights; the summary says what it cannot."""
    out = tmp_path / "peers.json"
    run_script("peers.py", *TINY, "--cache-dir", str(cache), "--out", str(out))
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["config"]["scheduler"] == "ddim"
    assert doc["config"]["height"] == 64 and doc["config"]["images_per_process"] == 2
    assert doc["machine"]["cpu"] and "bench/peers.py" in doc["command"]
    assert "IAP_RT_OPTIMUM_PYTHON" in doc["skipped"]["optimum"]
    assert [r["tool"] for r in doc["runs"]] == ["iaprt", "diffusers"]
    for row in doc["runs"]:
        check_run(row, row["tool"])
    assert doc["runs"][1]["images"][0]["text_encoder_calls"] == 2  # negative + positive
    iaprt = doc["tools"]["iaprt"]
    assert iaprt["export"]["seconds"] > 0 and iaprt["export"]["peak_rss_mb"] > 0
    assert iaprt["versions"]["iap-rt"] and doc["tools"]["diffusers"]["versions"]["diffusers"]
    # the diffusers base holds the bench's UNet and VAE (links) and a CLIP text encoder
    base = Path(doc["tools"]["diffusers"]["model_dir"])
    assert (base / "unet").resolve() == (cache / "tiny-seed0" / "sd" / "unet").resolve()
    assert (base / "text_encoder" / "config.json").is_file()
    s = doc["summary"]
    assert s["end_to_end"]["optimum"]["ahead"] is None and s["end_to_end"]["ahead_of_both"] is None
    assert s["end_to_end"]["diffusers"]["ratio"] > 0 and s["done"] is False

    again = tmp_path / "again.json"  # a second run reuses the export and its record
    run_script(
        "peers.py", *TINY, "--tools", "iaprt", "--cache-dir", str(cache), "--out", str(again)
    )
    doc2 = json.loads(again.read_text())
    assert doc2["exports"]["iaprt"]["reused"] is True
    assert doc2["exports"]["iaprt"]["seconds"] == iaprt["export"]["seconds"]


@NEEDS_OPTIMUM
def test_peers_with_optimum(cache, tmp_path):
    """The optimum part: its re-keyed CLIP loads with no new weights under transformers 4.x,
    its own export is timed, and its pipeline runs with every stage timed."""
    out = tmp_path / "peers.json"
    run_script("peers.py", *TINY, "--cache-dir", str(cache), "--out", str(out), optimum=OPTIMUM)
    doc = json.loads(out.read_text())
    assert doc["skipped"] == {}
    assert [r["tool"] for r in doc["runs"]] == ["iaprt", "optimum", "diffusers"]
    for row in doc["runs"]:
        check_run(row, row["tool"])
    opt = doc["tools"]["optimum"]
    assert opt["versions"]["optimum-onnx"] and opt["versions"]["transformers"].startswith("4.")
    check = opt["text_encoder"]
    assert check["rekeyed_keys"] > 0 and check["check"]["ok"] and check["check"]["problems"] == {}
    assert opt["export"]["seconds"] > 0 and opt["export"]["peak_rss_mb"] > 0
    assert (Path(opt["model_dir"]) / "vae_decoder" / "model.onnx").is_file()
    info = doc["runs"][1]["worker"]["info"]
    assert info["session_options"]["intra_op_num_threads"] == 1
    s = doc["summary"]
    for key in ("end_to_end", "vae_decode"):
        assert isinstance(s[key]["ahead_of_both"], bool)
        assert all(s[key][p]["ratio"] > 0 for p in ("optimum", "diffusers"))


def test_vae_gap_at_tiny_size(cache, tmp_path):
    """bench/vae_gap.py: one fresh process per config, each call timed with RSS after it; the
    session options in effect are recorded (iap-rt's runtime turns spinning off)."""
    configs = ["iaprt:runtime", "iaprt:peers+arena=0", "iaprt:backend", "iaprt:pipeline"]
    prep = ["--arch", "tiny", "--threads", "1", "--cache-dir", str(cache), "--prepare-only"]
    if OPTIMUM:
        configs.append("optimum:runtime")
        run_script("peers.py", *prep, "--tools", "iaprt,optimum", optimum=OPTIMUM)
    else:
        run_script("peers.py", *prep, "--tools", "iaprt")
    out = tmp_path / "gap.json"
    run_script(
        "vae_gap.py", "--arch", "tiny", "--calls", "2", "--threads", "1", "--pipeline-steps",
        "1", "--cache-dir", str(cache), "--configs", ",".join(configs), "--out", str(out),
    )  # fmt: skip
    doc = json.loads(out.read_text())
    rows = {r["config"]: r for r in doc["rows"]}
    assert list(rows) == configs and all(r["rc"] == 0 for r in rows.values())
    for r in rows.values():
        assert [c["call"] for c in r["calls"]] == [1, 2]
        assert all(c["seconds"] > 0 and c["hwm_mb"] >= c["rss_mb"] > 0 for c in r["calls"])
    runtime, peers = rows["iaprt:runtime"]["session"], rows["iaprt:peers+arena=0"]["session"]
    assert runtime["options"]["allow_spinning"] == "0"
    assert runtime["options"]["inter_op_num_threads"] == 1
    assert peers["options"]["enable_cpu_mem_arena"] is False
    assert peers["options"]["allow_spinning"].startswith("unset")
    assert doc["graph_facts"]["iaprt"]["ops"]["Conv"] > 0
    assert set(doc["medians"]) == set(configs)


def test_peers_worker_imports_no_iap_rt():
    """The peers' worker runs under optimum's interpreter, where iap_rt is not installed."""
    import ast

    tree = ast.parse((BENCH / "peers_worker.py").read_text("utf-8"))
    mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert mods and not [m for m in mods if m.split(".")[0] == "iap_rt"]
