"""Training at scale on this machine: samples/s with 1 and 2 processes, the cache-build rate,
and the time and memory to index a data file of a million rows.

    python bench/train_scale.py throughput --arch toy   # -> results/train_scale_toy.json
    python bench/train_scale.py throughput --arch tiny  # -> results/train_scale_tiny.json
    python bench/train_scale.py cache --arch tiny       # -> results/train_cache_tiny.json
    python bench/train_scale.py index --rows 1000000    # -> results/train_index_1m.json

- ``throughput``: real ``iap-rt train`` runs (pivot objective, the cache built beforehand and
  not timed) with the same global batch on 1 and on 2 processes (``--num-processes 2``:
  gloo on the CPU, each process half the batch and half the cores). samples/s is taken from
  metrics.jsonl after the first log window (warm-up). On a 2-core machine the 2-process figure
  shows that the job is correct and what the gloo all-reduce costs, not a speed-up: both
  processes share the same two cores.
- ``cache``: ``--cache-only`` work in one process on distinct generated images and captions:
  images/s through the VAE encoder and captions/s through CLIP, timed per phase.
- ``index``: a JSONL (or ``--format parquet``) of N rows whose images are a few files
  repeated (unique captions), read and planned the way ``iap-rt train`` does before loading
  any model (parse, hash and check the images, split off validation, then one pass computing
  every row's English cache key); wall time per phase and peak RSS of that process.

Every result JSON holds the command line, the machine and the load average at the start.
Run it on a quiet machine; ``--smoke`` runs everything at a toy size (for the test that the
script works, not for numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from iap_rt.bench.machine import machine_info, peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ARCHS = {
    # resolution, global batch, steps, log window; toy: the shipped toy base + encoder
    "toy": dict(resolution=32, batch=32, steps=40, log_every=10, rows=256),
    "tiny": dict(resolution=64, batch=8, steps=40, log_every=10, rows=64),
}


def write_result(name: str, report: dict, argv: list[str]) -> Path:
    from iap_rt.fileio import write_json_atomic

    report = {
        "command": shlex.join(["python", "bench/train_scale.py", *argv]),
        "machine": machine_info(),
        **report,
    }
    path = RESULTS / name
    write_json_atomic(path, report)
    print(f"wrote {path}")
    return path


# ---- data ----------------------------------------------------------------------------------


def write_images(d: Path, n: int, size: int, seed: int = 0) -> list[str]:
    """``n`` distinct noise PNGs of ``size`` pixels."""
    import numpy as np
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"{i:06d}.png"
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(a).save(d / name)
        names.append(f"images/{name}")
    return names


def write_rows(path: Path, images: list[str], n: int, fmt: str = "jsonl") -> Path:
    """``n`` rows cycling through ``images``, every caption unique."""
    zh = (f"第{i}只红色的猫坐在蓝色的椅子上" for i in range(n))
    en = (f"a red cat number {i} sitting on a blue chair" for i in range(n))
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {"image": [images[i % len(images)] for i in range(n)], "zh": list(zh), "en": list(en)}
        )
        pq.write_table(table, path, row_group_size=65536)
        return path
    with open(path, "w", encoding="utf-8") as f:
        for i, (z, e) in enumerate(zip(zh, en)):
            f.write(json.dumps({"image": images[i % len(images)], "zh": z, "en": e}) + "\n")
    return path


def toy_models() -> tuple[Path, Path]:
    """The embedded default model's PyTorch sources: the toy English base and Chinese encoder."""
    from iap_rt.modeldir import default_model_sources

    return default_model_sources()


def tiny_models(work: Path) -> tuple[Path, Path]:
    from iap_rt.train.tiny import make_tiny_encoder, make_tiny_sd

    sd, enc = work / "tiny-sd", work / "tiny-encoder"
    if not (sd / "model_index.json").is_file():
        make_tiny_sd(sd, seed=0)
    if not (enc / "model.safetensors").is_file():
        make_tiny_encoder(enc, seed=0)
    return sd, enc


def models(arch: str, work: Path) -> tuple[Path, Path]:
    return toy_models() if arch == "toy" else tiny_models(work)


# ---- throughput -----------------------------------------------------------------------------


def throughput(args, argv) -> None:
    a = dict(ARCHS[args.arch])
    if args.smoke:
        a.update(steps=4, log_every=2, rows=16, batch=4)
    work = Path(args.work or tempfile.mkdtemp(prefix="iap-rt-scale-"))
    base, enc = models(args.arch, work)
    data = work / f"{args.arch}-data"
    if args.arch == "toy":  # the toy world's own images and captions
        from iap_rt.train.toy.data import write_dataset

        if not (data / "train.jsonl").is_file():
            write_dataset(data, n=a["rows"], n_test=8)
        rows = data / "train.jsonl"
    else:
        rows = data / "data.jsonl"
        if not rows.is_file():
            write_rows(rows, write_images(data / "images", a["rows"], 64), a["rows"])
    common = ["--base", base, "--encoder", enc, "--data", rows]
    common += ["--resolution", a["resolution"], "--lr-schedule", "constant", "--warmup-steps", 0]
    common += ["--val-every", 0, "--checkpoint-every", 0, "--log-every", a["log_every"]]
    common += ["--cache-dir", work / f"{args.arch}-cache"]
    _iap(["train", *common, "--out", work / "warm", "--cache-only"], {})
    results = []
    for procs in args.processes:
        out = work / f"{args.arch}-p{procs}"
        cmd = ["train", *common, "--out", out, "--max-steps", a["steps"]]
        cmd += ["--batch-size", a["batch"] // procs, "--num-processes", procs]
        threads = args.threads or max(1, (os.cpu_count() or 1) // procs)
        env = {"OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        _iap(cmd, env)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        timed = [m for m in lines if "samples_per_s" in m][1:] or lines  # skip warm-up window
        seconds = sum(a["log_every"] * a["batch"] / m["samples_per_s"] for m in timed)
        sps = len(timed) * a["log_every"] * a["batch"] / seconds
        rec = {
            "processes": procs,
            "batch_size_per_process": a["batch"] // procs,
            "threads_per_process": threads,
            "global_batch": a["batch"],
            "samples_per_s": round(sps, 2),
            "s_per_step": round(a["batch"] / sps, 4),
            "steps": a["steps"],
            "wall_s_incl_startup": round(wall, 1),
            "final_loss": lines[-1]["loss"],
        }
        results.append(rec)
        print(json.dumps(rec), flush=True)
    note = (
        "2 processes on a 2-core machine share the same cores: the figure shows the job is "
        "correct and what gloo's all-reduce and a second Python process cost, not a speed-up."
    )
    report = {"config": {"kind": "train_scale", "arch": args.arch, **a}, "results": results}
    report["notes"] = [note]
    if not args.smoke:
        write_result(args.out or f"train_scale_{args.arch}.json", report, argv)


def _iap(args: list, env: dict) -> None:
    cmd = [sys.executable, "-m", "iap_rt.cli", *map(str, args)]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")


# ---- cache-build rate -----------------------------------------------------------------------


def cache(args, argv) -> None:
    n = 8 if args.smoke else args.images
    work = Path(args.work or tempfile.mkdtemp(prefix="iap-rt-cache-"))
    base, enc = models(args.arch, work)
    res = ARCHS.get(args.arch, {}).get("resolution", 512)
    data = work / f"cache-{args.arch}-{n}"
    write_rows(data / "data.jsonl", write_images(data / "images", n, res + res // 4, seed=1), n)
    child = [sys.executable, __file__, "cache-child", "--base", str(base), "--encoder", str(enc)]
    child += ["--data", str(data / "data.jsonl"), "--resolution", str(res)]
    child += ["--out", str(work / f"cache-run-{n}")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(child, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(rec))
    if not args.smoke:
        cfg = {"kind": "train_cache", "arch": args.arch, "resolution": res, "threads": args.threads}
        write_result(
            args.out or f"train_cache_{args.arch}.json", {"config": cfg, "results": rec}, argv
        )


def cache_child(args) -> None:
    """One process: time each fill_cache phase of a --cache-only build."""
    import iap_rt.train.dataset as ds
    from iap_rt.train.config import TrainConfig
    from iap_rt.train.trainer import run

    phases = []
    real = ds.fill_cache

    def timed(cache, todo, *a, **kw):
        t0 = time.perf_counter()
        n = real(cache, todo, *a, **{**kw, "progress": False})
        phases.append({"what": kw.get("what"), "items": n, "s": time.perf_counter() - t0})
        return n

    ds.fill_cache = timed
    cfg = TrainConfig(
        base=args.base, encoder=args.encoder, data=args.data, out=args.out,
        resolution=args.resolution,
    )  # fmt: skip
    t0 = time.perf_counter()
    run(cfg, cache_only=True)
    rec = {"wall_s_incl_model_load": round(time.perf_counter() - t0, 2)}
    for p in phases:
        rec[f"{p['what']}_encoded"] = p["items"]
        rec[f"{p['what']}_s"] = round(p["s"], 3)
        rec[f"{p['what']}_per_s"] = round(p["items"] / max(p["s"], 1e-9), 2)
    rec["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(rec))


# ---- indexing a million rows ----------------------------------------------------------------


def index(args, argv) -> None:
    n = 20000 if args.smoke else args.rows
    work = Path(args.work or tempfile.mkdtemp(prefix="iap-rt-index-"))
    base, enc = tiny_models(work)
    data = work / f"index-{n}"
    path = data / f"data.{args.format}"
    if not path.is_file():
        t0 = time.perf_counter()
        write_rows(path, write_images(data / "images", 4, 80), n, args.format)
        print(
            f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f}s"
        )
    child = [sys.executable, __file__, "index-child", "--base", str(base), "--encoder", str(enc)]
    child += ["--data", str(path), "--out", str(work / "index-run")]
    proc = subprocess.run(
        child, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec.update(rows=n, format=args.format, file_mib=round(path.stat().st_size / 2**20, 1))
    rec["targets"] = {"total_s": 60, "peak_rss_mb": 1024}
    print(json.dumps(rec))
    if not args.smoke:
        name = args.out or f"train_index_{n // 1000}k_{args.format}.json".replace("1000k", "1m")
        write_result(name, {"config": {"kind": "train_index"}, "results": rec}, argv)


def index_child(args) -> None:
    """What ``iap-rt train`` does with the data before loading a model, timed per phase."""
    t0 = time.perf_counter()
    from iap_rt.train.config import TrainConfig
    from iap_rt.train.dataset import plan_sets, read_sets
    from iap_rt.train.latent_cache import text_key

    rec = {
        "import_s": round(time.perf_counter() - t0, 2),
        "rss_after_imports_mb": round(peak_rss_mb(), 1),
    }
    cfg = TrainConfig(
        base=args.base, encoder=args.encoder, data=args.data, out=args.out, val_count=1000
    )
    t = time.perf_counter()
    rows, _ = read_sets(cfg)
    rec["read_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    plan = plan_sets(cfg, rows, None)
    rec["plan_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    keys = 0
    en = rows.en
    for r in plan.train.usable_ids().tolist():
        text_key(en[r])
        keys += 1
    rec["english_keys_s"] = round(time.perf_counter() - t, 2)
    rec["total_s"] = round(rec["read_s"] + rec["plan_s"] + rec["english_keys_s"], 2)
    rec["peak_rss_mb"] = round(peak_rss_mb(), 1)
    rec["rows_indexed"] = len(rows)
    rec["distinct_images"] = len(rows.images)
    rec["caption_bytes_mb"] = round((rows.zh.nbytes + rows.en.nbytes) / 2**20, 1)
    print(json.dumps(rec))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput", help="samples/s with 1 and 2 processes")
    t.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    t.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    t.add_argument("--threads", type=int, help="threads per process (default: cores / processes)")
    c = sub.add_parser("cache", help="cache-build rate (images/s, captions/s)")
    c.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    c.add_argument("--images", type=int, default=256)
    c.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    i = sub.add_parser("index", help="index a data file of --rows rows")
    i.add_argument("--rows", type=int, default=1_000_000)
    i.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    for q in (t, c, i):
        q.add_argument("--work", help="scratch directory (default: a new temp dir)")
        q.add_argument("--out", help="result file name under bench/results/")
        q.add_argument("--smoke", action="store_true", help="tiny sizes, no result file")
    for name in ("cache-child", "index-child"):
        q = sub.add_parser(name)
        for opt in ("--base", "--encoder", "--data", "--out"):
            q.add_argument(opt)
        q.add_argument("--resolution", type=int, default=64)
    args = p.parse_args(argv)
    {
        "throughput": lambda: throughput(args, argv),
        "cache": lambda: cache(args, argv),
        "index": lambda: index(args, argv),
        "cache-child": lambda: cache_child(args),
        "index-child": lambda: index_child(args),
    }[args.cmd]()


if __name__ == "__main__":
    main()
