"""iap-rt against its peers on the CPU, same weights, same job (issue 31):

    python bench/peers.py [--arch sd15|tiny] [--steps 10] [--size 512] [--threads 2] [--runs 3]
                          [--images 2] [--tools iaprt,optimum,diffusers]
                          [--optimum-python PATH] [--out bench/results/peers_ARCH_cpu.json]

- ``iaprt``: ``iap-rt generate --backend ort --json`` (the runtime's own CLI, fresh process).
- ``optimum``: optimum-onnx's ``ORTStableDiffusionPipeline`` on its own export
  (``optimum-cli export onnx --task text-to-image``), in its own venv
  (``--optimum-python``, default ``$IAP_RT_OPTIMUM_PYTHON``; without one the tool is skipped
  and the JSON says why): optimum-onnx pins transformers 4.57, which reads a CLIP text encoder
  saved by transformers 5 (no ``text_model.`` prefix) as a missing one and silently
  initialises it at random, so optimum reads a re-keyed copy, checked to load with no new
  weights before anything runs.
- ``diffusers``: diffusers' torch fp32 ``StableDiffusionPipeline`` (this interpreter).

Same SD 1.5-shaped random weights for all three: the sources ``iap-rt bench`` builds and caches
(``python -m iap_rt.train.bench_torch build``: ``iap_rt.train.sd15`` / ``.tiny``, seed 0),
exported by ``iap-rt export`` with the arguments ``iap-rt bench`` uses. The peers get the
English side: a CLIP text encoder of the arch's config (sd15: built once with the seed rule of
``iap_rt.train.tiny.write_sd_dir``, since the bench's SD 1.5 base has none). DDIM, guidance
7.5, ``--images`` images per process (image 1 is the cold one, the rest are "warm"), ``--runs``
fresh processes per tool, the tools' order rotating run by run. Per run: warm end-to-end image
time, UNet step, VAE decode (first and warm), text encoder, cold start (process start to the
first PNG on disk), peak RSS (``ru_maxrss`` of the process from ``wait4``: its VmHWM). Per
tool: export time and peak RSS (``iap-rt export`` vs optimum's export; kept beside each export
and reused by later runs unless ``--fresh-exports``). Medians with [min, max].

The peers' worker code is ``bench/peers_worker.py`` (standalone: runs under the optimum venv's
interpreter without iap_rt). ``--prepare-only`` builds and exports without runs (what
``bench/vae_gap.py`` needs). Everything lives in ``<cache>/<arch>-seed0/peers/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

from iap_rt.bench.config import BUILD_SEED, BenchConfig
from iap_rt.bench.machine import machine_info
from iap_rt.bench.protocol import child_env, last_line
from iap_rt.bench.sources import Sources, cache_root, export_args, model_ok
from iap_rt.fileio import write_json_atomic, write_text_atomic

BENCH = Path(__file__).resolve().parent
WORKER = BENCH / "peers_worker.py"
TOOLS = ("iaprt", "optimum", "diffusers")
DEFAULT_SIZE = {"tiny": 64, "sd15": 512}
# one prompt per image of a process, the same scene in both languages: distinct prompts, so
# that no image reuses an earlier image's prompt embedding (iap-rt caches them per process)
PROMPTS_ZH = ["一幅山水画，远处是高山，近处有一条小船", "一只猫坐在窗台上，阳光照进房间",
              "海边的灯塔，夕阳西下", "雪山下的小村庄，炊烟袅袅"]  # fmt: skip
PROMPTS_EN = ["a landscape painting, high mountains far away, a small boat nearby",
              "a cat sitting on a windowsill, sunlight in the room",
              "a lighthouse by the sea at sunset", "a small village below snowy mountains, smoke "
              "rising from chimneys"]  # fmt: skip
METRICS = ("e2e_s", "unet_step_s", "unet_step_mean_s", "vae_decode_s", "vae_decode_first_s",
           "text_encoder_s", "cold_start_s", "peak_rss_mb")  # fmt: skip
EXPORT_RECORD = ".export.json"  # beside the export: <dir>.export.json


# ---- processes -----------------------------------------------------------------------------------
def run_process(cmd: list[str], cwd: Path, env: dict, timeout: float | None) -> dict:
    """Run ``cmd``; each stdout line with the seconds since the process started, the exit
    code, the wall time, and the peak RSS of the process (``ru_maxrss`` from ``wait4``, MiB:
    its VmHWM, or that of its largest child)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True, bufsize=1)  # fmt: skip
        killed = threading.Event()

        def kill():
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in proc.stdout]
        _, status, usage = os.wait4(proc.pid, 0)
        wall_s = time.perf_counter() - t0
        if timer:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    return {"rc": proc.returncode, "wall_s": wall_s, "lines": lines, "stderr": stderr,
            "peak_rss_mb": usage.ru_maxrss / 1024, "timed_out": killed.is_set()}  # fmt: skip


def failure(proc: dict, what: str) -> str:
    if proc["timed_out"]:
        return f"{what} timed out (killed): {last_line(proc['stderr'])}"
    return f"{what} exited {proc['rc']}: {last_line(proc['stderr'])}"


def json_lines(proc: dict) -> list[tuple[float, dict]]:
    out = []
    for t, line in proc["lines"]:
        if line.startswith("{"):
            try:
                out.append((t, json.loads(line)))
            except json.JSONDecodeError:
                pass
    return out


def tool_env(threads: int) -> dict:
    env = child_env(threads)
    env["IAP_RT_THREADS"] = str(threads)
    return env


# ---- preparing: sources, the peers' base, both exports ------------------------------------------
def build_text_encoder(arch: str, out: str) -> int:
    """(child, torch) The CLIP text encoder of ``arch``'s config, seeded like
    ``write_sd_dir`` seeds it (``BUILD_SEED + 2``)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from iap_rt.train.sd15 import CLIP_L_TEXT
    from iap_rt.train.tiny import TINY_CLIP

    torch.manual_seed(BUILD_SEED + 2)
    config = {"sd15": CLIP_L_TEXT, "tiny": TINY_CLIP}[arch]
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(out)
    write_text_atomic(Path(out) / ".complete", f"{arch} CLIP text encoder, seed {BUILD_SEED + 2}\n")
    return 0


def rekey_text_encoder(src: Path, dst: Path) -> int:
    """Copy a transformers-5 ``CLIPTextModel`` to ``dst`` with every weight under
    ``text_model.`` (what transformers 4.57 looks for); returns how many keys moved."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    weights = load_file(src / "model.safetensors")
    moved = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()}
    save_file(moved, dst / "model.safetensors", metadata={"format": "pt"})
    return sum(not k.startswith("text_model.") for k in weights)


def link_base(sd: Path, text_encoder: Path, out: Path) -> Path:
    """``out``: ``sd``'s entries as symlinks, with ``text_encoder`` as its text encoder."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for entry in sd.iterdir():
        if entry.name not in ("text_encoder", ".complete"):
            (out / entry.name).symlink_to(entry.resolve())
    (out / "text_encoder").symlink_to(text_encoder.resolve())
    return out


def timed_export(cmd: list[str], out: Path, cwd: Path, env: dict, fresh: bool, timeout, log):
    """Run an export into ``out`` once, timed (wall, peak RSS); later calls reuse it and its
    record unless ``fresh``."""
    record = out.parent / f"{out.name}{EXPORT_RECORD}"
    if record.is_file() and out.is_dir() and not fresh:
        return json.loads(record.read_text()) | {"reused": True}
    shutil.rmtree(out, ignore_errors=True)
    record.unlink(missing_ok=True)
    log(f"exporting: {shlex.join(cmd)}")
    proc = run_process(cmd, cwd, env, timeout)
    if proc["rc"] != 0:
        raise RuntimeError(failure(proc, "the export"))
    doc = {"seconds": round(proc["wall_s"], 3), "peak_rss_mb": round(proc["peak_rss_mb"], 1),
           "command": shlex.join(cmd), "date": now()}  # fmt: skip
    write_json_atomic(record, doc)
    return doc | {"reused": False}


def prepare(args, log) -> dict:
    """Build (once) and export (once) what every tool runs; ``tools[tool]`` says where it is,
    its export record, or why it is skipped."""
    root = cache_root(args.cache_dir, args.arch)
    work = root / "peers"
    work.mkdir(parents=True, exist_ok=True)
    env = tool_env(args.threads)
    sd, encoder = root / "sd", root / "encoder"
    if not all((d / ".complete").is_file() for d in (sd, encoder)):
        log(f"building the {args.arch} sources in {root} (iap-rt bench's cache)")
        build = [sys.executable, "-m", "iap_rt.train.bench_torch", "build", args.arch, str(root)]
        proc = run_process(build, root.parent, env, args.timeout)
        if proc["rc"] != 0:
            raise RuntimeError(failure(proc, "building the sources"))
    clip = sd / "text_encoder"
    if not (clip / "config.json").is_file():  # sd15: the bench's base has no text encoder
        clip = work / "text_encoder"
        if not (clip / ".complete").is_file():
            log(f"building the {args.arch} CLIP text encoder in {clip}")
            shutil.rmtree(clip, ignore_errors=True)
            cmd = [sys.executable, __file__, "_build-text-encoder", args.arch, str(clip)]
            proc = run_process(cmd, work, env, args.timeout)
            if proc["rc"] != 0:
                raise RuntimeError(failure(proc, "building the CLIP text encoder"))
    base = link_base(sd, clip, work / "base")
    tools: dict[str, dict] = {t: {} for t in args.tools}

    if "iaprt" in tools:
        model = work / "iaprt-model"
        sources = Sources(model, sd, encoder)
        cmd = [sys.executable, "-m", "iap_rt.cli", *export_args(BenchConfig(arch=args.arch),
                                                               sources)]  # fmt: skip
        if not model_ok(model):
            (work / f"{model.name}{EXPORT_RECORD}").unlink(missing_ok=True)
        export = timed_export(cmd, model, work, env, args.fresh_exports, args.timeout, log)
        ort_unet = (model / "unet.ort.onnx").is_file()
        tools["iaprt"] = {"model_dir": str(model), "export": export,
                          "versions": {p: metadata.version(p) for p in ("iap-rt", "onnxruntime",
                                                                         "numpy", "tokenizers")},
                          "unet_graph": "unet.ort.onnx (ONNX Runtime MultiHeadAttention)"
                          if ort_unet else "unet.onnx"}  # fmt: skip
    if "diffusers" in tools:
        tools["diffusers"] = {"model_dir": str(base), "export": None,
                              "note": "no export: runs the PyTorch weights",
                              "versions": interpreter_versions(sys.executable, work, env)}  # fmt: skip
    if "optimum" in tools:
        tools["optimum"] = prepare_optimum(args, work, base, clip, env, log)
    return {"work": str(work), "base": str(base), "tools": tools}


def interpreter_versions(python: str, work: Path, env: dict) -> dict:
    """What ``python`` has (torch, diffusers, transformers, optimum, ...), asked of the worker."""
    proc = run_process([python, str(WORKER), "versions"], work, env, 300)
    events = [e for _, e in json_lines(proc) if e.get("event") == "versions"]
    if proc["rc"] != 0 or not events:
        raise RuntimeError(failure(proc, f"{python} {WORKER.name} versions"))
    return events[0]["versions"]


def prepare_optimum(args, work: Path, base: Path, clip: Path, env: dict, log) -> dict:
    python = args.optimum_python
    if not python:
        return {"skipped": "no optimum interpreter: pass --optimum-python PATH or set "
                "IAP_RT_OPTIMUM_PYTHON (a venv with optimum-onnx, its own transformers)"}  # fmt: skip
    if not Path(python).is_file():
        return {"skipped": f"--optimum-python {python} does not exist"}
    info: dict = {"python": python}
    try:
        info["versions"] = interpreter_versions(python, work, env)
    except RuntimeError as e:
        return info | {"skipped": str(e)}
    # optimum's copy of the base: the same files, the text encoder re-keyed for transformers 4.x
    obase = work / "optimum-base"
    rekeyed = work / "optimum-text_encoder"
    moved = rekey_text_encoder(clip, rekeyed)
    link_base(base, rekeyed, obase)
    proc = run_process([python, str(WORKER), "check-text-encoder", str(rekeyed)], work, env, 600)
    checks = [e for _, e in json_lines(proc) if e.get("event") == "text_encoder_check"]
    info["text_encoder"] = {"rekeyed_keys": moved, "check": checks[0] if checks else None}
    if proc["rc"] != 0:
        return info | {"skipped": "the re-keyed CLIP text encoder does not load cleanly under "
                       f"optimum's transformers: {failure(proc, 'check-text-encoder')}"}  # fmt: skip
    model = work / "optimum-model"
    cmd = [python, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(obase),
           "--task", "text-to-image", str(model)]  # fmt: skip
    try:
        info["export"] = timed_export(cmd, model, work, env, args.fresh_exports, args.timeout, log)
    except RuntimeError as e:
        return info | {"skipped": str(e)}
    info["model_dir"] = str(model)
    return info


# ---- one run of one tool --------------------------------------------------------------------------
def iaprt_command(args, model: str, prompts_file: Path, out: Path) -> list[str]:
    dest = out / "00000.png" if args.images == 1 else out
    return [sys.executable, "-m", "iap_rt.cli", "generate", "--prompts-file", str(prompts_file),
            "--model", model, "--backend", "ort", "--scheduler", "ddim",
            "--steps", str(args.steps), "--guidance", str(args.guidance),
            "--height", str(args.size), "--width", str(args.size), "--seed", str(args.seed),
            "--out", str(dest), "--json", "--no-progress", "--memory-limit", "off"]  # fmt: skip


def image_row(t: float, e: dict, tool: str) -> dict:
    """One image's line -> the common per-image record (seconds)."""
    tm = e["timings"]
    if tool == "iaprt":  # --json carries the UNet time summed over steps: the mean step
        steps = tm["unet_steps"]
        mean = tm["unet_s"] / max(1, steps)
        row = {"e2e_s": tm["total_s"], "unet_step_s": tm.get("unet_step_median_s", mean),
               "unet_step_mean_s": mean,
               "unet_steps": steps, "text_encoder_s": tm["text_encoder_s"],
               "vae_decode_s": tm["vae_decode_s"], "open_s": tm.get("open_s"),
               "load_s": tm.get("load_s")}  # fmt: skip
    else:
        steps = tm["unet_step_s"]
        row = {"e2e_s": tm["total_s"], "unet_step_s": statistics.median(steps) if steps else None,
               "unet_step_mean_s": statistics.fmean(steps) if steps else None,
               "unet_steps": len(steps), "text_encoder_s": tm["text_encoder_s"],
               "text_encoder_calls": tm["text_encoder_calls"],
               "vae_decode_s": tm["vae_decode_s"]}  # fmt: skip
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} | {
        "at_s": round(t, 3)
    }


def run_tool(args, tool: str, info: dict, run_dir: Path) -> dict:
    """One fresh process of ``tool``: ``--images`` images; its timings and peak RSS."""
    env = tool_env(args.threads)
    n = args.images
    out = run_dir / "images"
    if tool == "iaprt":
        pf = run_dir / "prompts.txt"
        pf.write_text("\n".join(PROMPTS_ZH[i % len(PROMPTS_ZH)] for i in range(n)) + "\n", "utf-8")
        cmd = iaprt_command(args, info["model_dir"], pf, out)
    else:
        spec = {"model_dir": info["model_dir"], "steps": args.steps, "guidance": args.guidance,
                "height": args.size, "width": args.size, "seed": args.seed,
                "threads": args.threads, "out_dir": str(out),
                "prompts": [PROMPTS_EN[i % len(PROMPTS_EN)] for i in range(n)]}  # fmt: skip
        spec_file = run_dir / "spec.json"
        spec_file.write_text(json.dumps(spec))
        python = info["python"] if tool == "optimum" else sys.executable
        cmd = [python, str(WORKER), tool, str(spec_file)]
    proc = run_process(cmd, run_dir, env, args.timeout)
    events = json_lines(proc)
    images = [(t, e) for t, e in events if "timings" in e and "path" in e]
    row = {"status": "ok", "wall_s": round(proc["wall_s"], 3),
           "peak_rss_mb": round(proc["peak_rss_mb"], 1)}  # fmt: skip
    if proc["rc"] != 0 or len(images) != n or not all(Path(e["path"]).is_file() for _, e in images):
        return row | {"status": "error", "reason": failure(proc, tool), "images_done": len(images)}
    rows = [image_row(t, e, tool) for t, e in images]
    row["cold_start_s"] = rows[0]["at_s"]  # process start -> the first PNG on disk
    row["images"] = rows
    row["vae_decode_first_s"] = rows[0]["vae_decode_s"]
    warm = rows[1:]
    for key in ("e2e_s", "unet_step_s", "unet_step_mean_s", "vae_decode_s", "text_encoder_s"):
        row[key] = statistics.median(r[key] for r in warm) if warm else None
    for _, e in events:
        if e.get("event") == "loaded":
            row["worker"] = {k: e[k] for k in ("import_s", "load_s", "info") if k in e}
        if e.get("event") == "done":
            row["vmhwm_mb"] = e.get("vmhwm_mb")
    return row


# ---- results ---------------------------------------------------------------------------------------
def spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 6), "min": round(min(values), 6),
            "max": round(max(values), 6), "n": len(values)}  # fmt: skip


def aggregate(runs: list[dict], tools: list[str]) -> dict:
    out = {}
    for tool in tools:
        ok = [r for r in runs if r["tool"] == tool and r["status"] == "ok"]
        if ok:
            out[tool] = {m: spread([r.get(m) for r in ok]) for m in METRICS} | {"runs_ok": len(ok)}
    return out


def summary(results: dict) -> dict:
    """Whether iap-rt is ahead of both peers end to end and in VAE decode (warm image
    medians); ratio = peer / iap-rt (> 1: iap-rt faster)."""
    doc: dict = {"basis": "medians over runs of the warm images (image 2.. of each process); "
                 "ratio = peer seconds / iap-rt seconds, > 1: iap-rt is faster"}  # fmt: skip
    for metric, key in (("e2e_s", "end_to_end"), ("vae_decode_s", "vae_decode"),
                        ("unet_step_mean_s", "unet_step_mean")):  # fmt: skip
        mine = ((results.get("iaprt") or {}).get(metric) or {}).get("median")
        part = {}
        for peer in ("optimum", "diffusers"):
            theirs = ((results.get(peer) or {}).get(metric) or {}).get("median")
            if mine and theirs:
                part[peer] = {"ahead": theirs > mine, "ratio": round(theirs / mine, 3)}
            else:
                part[peer] = {"ahead": None, "ratio": None, "why": "not measured"}
        ahead = [p["ahead"] for p in part.values()]
        part["ahead_of_both"] = None if None in ahead else all(ahead)
        doc[key] = part
    doc["done"] = bool(doc["end_to_end"]["ahead_of_both"] and doc["vae_decode"]["ahead_of_both"])
    return doc


NOTES = [
    "iap-rt runs its Chinese text encoder (the bench's bert-base-chinese-sized encoder) on a "
    "Chinese prompt; the peers run a CLIP ViT-L/14-shaped text encoder on the same scene in "
    "English (tiny: the tiny CLIP / BERT).",
    "iap-rt caches prompt embeddings within a process (the empty negative prompt is encoded "
    "once per process); the peers encode the negative and the positive prompt every image.",
    "UNet step: iap-rt's --json timings carry the UNet time summed over the steps, so its "
    "unet_step_s is the mean step; the peers' unet_step_s is the median over the steps, and "
    "unet_step_mean_s is the mean for all three (compare those).",
    "VAE decode: iap-rt's vae_decode_s includes the conversion to uint8; the peers' is the "
    "decoder session run (optimum) or vae.decode (diffusers) alone.",
    "optimum's sessions: ONNX Runtime's default SessionOptions with intra_op_num_threads = "
    "--threads (all else default: spinning on); iap-rt's: as its runtime creates them "
    "(iap_rt.backends.ort.OrtBackend.session_options).",
    "peak_rss_mb: ru_maxrss of the process (wait4), i.e. its VmHWM; cold_start_s: process "
    "start (Popen) to the first image's line, printed after its PNG is written.",
]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=tuple(DEFAULT_SIZE), default="sd15")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, help="image side; default sd15 512, tiny 64")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="fresh processes per tool")
    p.add_argument("--images", type=int, default=2, help="images per process (>= 2: warm)")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--optimum-python", default=os.environ.get("IAP_RT_OPTIMUM_PYTHON"))
    p.add_argument("--cache-dir", help="default: iap-rt bench's (~/.cache/iap-rt/bench)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    p.add_argument("--fresh-exports", action="store_true", help="re-run (and re-time) exports")
    p.add_argument("--prepare-only", action="store_true", help="build and export, no runs")
    p.add_argument("--out", help="default bench/results/peers_<arch>_cpu.json")
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in args.tools if t not in TOOLS]
    if bad or not args.tools:
        p.error(f"--tools: {bad or 'none'}; choose from {', '.join(TOOLS)}")
    args.size = args.size or DEFAULT_SIZE[args.arch]
    if args.images < 1 or args.runs < 1:
        p.error("--images and --runs must be >= 1")
    args.out = Path(args.out or BENCH / "results" / f"peers_{args.arch}_cpu.json")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_build-text-encoder"]:
        return build_text_encoder(argv[1], argv[2])
    args = parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    doc = {"date": now(), "command": shlex.join(["python", "bench/peers.py", *argv]),
           "complete": False, "machine": machine_info(),
           "config": {"arch": args.arch, "height": args.size, "width": args.size,
                      "steps": args.steps, "guidance": args.guidance, "scheduler": "ddim",
                      "seed": args.seed, "threads": args.threads, "runs": args.runs,
                      "images_per_process": args.images, "tools": args.tools,
                      "prompts_zh": PROMPTS_ZH[: args.images],
                      "prompts_en": PROMPTS_EN[: args.images]},
           "notes": NOTES}  # fmt: skip
    prep = prepare(args, log)
    tools = prep["tools"]
    doc["tools"] = tools
    doc["skipped"] = {t: i["skipped"] for t, i in tools.items() if "skipped" in i}
    doc["exports"] = {t: i.get("export") for t, i in tools.items() if "skipped" not in i}
    if args.prepare_only:
        print(json.dumps({"work": prep["work"], "tools": tools}, indent=1))
        return 0
    active = [t for t in args.tools if "skipped" not in tools[t]]
    runs: list[dict] = []
    doc["runs"] = runs
    with tempfile.TemporaryDirectory(dir=prep["work"], prefix="runs-") as tmp:
        for r in range(args.runs):
            order = active[r % len(active) :] + active[: r % len(active)]
            for k, tool in enumerate(order):
                run_dir = Path(tmp) / f"{r}-{tool}"
                run_dir.mkdir()
                log(f"run {r + 1}/{args.runs}: {tool}")
                row = {"run": r, "tool": tool, "position": k, "start": now()}
                runs.append(row | run_tool(args, tool, tools[tool], run_dir))
                doc["results"] = aggregate(runs, active)
                write_json_atomic(args.out, doc)
    doc["results"] = aggregate(runs, active)
    doc["summary"] = summary(doc["results"])
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["complete"] = True
    write_json_atomic(args.out, doc)
    log(format_table(doc))
    return 0 if all(r["status"] == "ok" for r in runs) else 1


def format_table(doc: dict) -> str:
    res = doc.get("results", {})
    lines = ["| median [min, max] | " + " | ".join(res) + " |", "|---" * (len(res) + 1) + "|"]
    for m in METRICS:
        cells = []
        for tool in res:
            s = res[tool].get(m)
            cells.append("-" if not s else f"{s['median']:.4g} [{s['min']:.4g}, {s['max']:.4g}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for tool, e in (doc.get("exports") or {}).items():
        if e:
            lines.append(f"export {tool}: {e['seconds']} s, {e['peak_rss_mb']} MiB")
    lines.append(json.dumps(doc.get("summary", {})))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
