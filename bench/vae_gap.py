"""Why is iap-rt's second VAE decode slower and heavier than optimum's (issue 31, item 2)?

    python bench/peers.py --arch sd15 --prepare-only      # once: both exports (cached)
    python bench/vae_gap.py [--arch sd15|tiny] [--size 512] [--calls 4] [--threads 2]
                            [--rounds 2] [--configs LIST] [--pipeline-steps 2] [--out FILE.json]

Each config runs in a fresh process: it opens one VAE decoder session, then decodes the same
latents (batch 1, seeded) ``--calls`` times in a row, printing each call's seconds and the
process's RSS / peak RSS (VmRSS / VmHWM) after it. A config is ``GRAPH:OPTIONS[+KEY=VALUE...]``:

- GRAPH: ``iaprt`` (the iap-rt export's ``vae_decoder.onnx``) or ``optimum`` (optimum's
  ``vae_decoder/model.onnx``), both from ``bench/peers.py``'s cache.
- OPTIONS: ``runtime``: the SessionOptions iap-rt's runtime creates
  (``iap_rt.backends.ort.OrtBackend(device="cpu", threads=N).session_options("vae_decoder")``);
  ``peers``: what ``bench/peers.py`` gives optimum (ONNX Runtime's defaults +
  ``intra_op_num_threads = N``); ``default``: a bare ``ort.SessionOptions()``; ``backend``
  (iaprt only): the runtime's whole backend loaded as ``iap-rt generate`` loads it (text
  encoder, UNet and VAE sessions open), decoding through its runner; ``pipeline`` (iaprt
  only): ``iap_rt.pipeline.Pipeline`` generating ``--calls`` images of ``--pipeline-steps``
  steps (text encoder, UNet loop, VAE decode: the decode times are the pipeline's own).
- overrides, applied on top: ``spin=0|1`` (``session.intra_op.allow_spinning``), ``arena=0|1``
  (``enable_cpu_mem_arena``), ``mempattern=0|1`` (``enable_mem_pattern``), ``opt=disable|basic|
  extended|layout|all`` (graph optimisation level), ``threads=N`` (intra-op), ``inter=N``,
  ``shared=0|1`` (``session.use_env_allocators``: one CPU arena shared by the process's
  sessions, ``iap_rt.backends.ort.register_shared_cpu_arena``; the runtime's default since
  issue 31). ``vae`` + a key (``vaemempattern=1``): that override on the VAE decoder's
  session only (``backend``/``pipeline``; the others: every session).

The default configs cross graph x options (is it the graph or the options?), then put each
option iap-rt changes back to ONNX Runtime's default one at a time (which one?), then add the
other sessions of the process (is it the neighbours?). ``--rounds`` repeats the whole list,
alternating. Each session's effective options are recorded beside its timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
DEFAULT_SIZE = {"tiny": 64, "sd15": 512}
DEFAULT_CONFIGS = (
    "iaprt:runtime",
    "iaprt:peers",
    "optimum:peers",
    "optimum:runtime",
    "iaprt:runtime+spin=1",
    "iaprt:runtime+arena=0",
    "iaprt:runtime+mempattern=0",
    "iaprt:default",
    "iaprt:backend",
    "iaprt:pipeline",
)
GRAPHS = ("iaprt", "optimum")
OPTIONS = ("runtime", "peers", "default", "backend", "pipeline")
LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
          "extended": "ORT_ENABLE_EXTENDED", "layout": "ORT_ENABLE_LAYOUT",
          "all": "ORT_ENABLE_ALL"}  # fmt: skip
OVERRIDES = ("spin", "arena", "mempattern", "opt", "threads", "inter", "shared")
OVERRIDES += tuple("vae" + k for k in OVERRIDES)  # the VAE decoder's session only
SPIN = "session.intra_op.allow_spinning"
SHARED = "session.use_env_allocators"


def parse_config(text: str) -> dict:
    """``GRAPH:OPTIONS[+KEY=VALUE...]`` -> ``{"graph", "options", "overrides"}``."""
    head, *extra = text.split("+")
    graph, _, options = head.partition(":")
    overrides = dict(item.split("=", 1) for item in extra if "=" in item)
    bad = [i for i in extra if "=" not in i] + [k for k in overrides if k not in OVERRIDES]
    if graph not in GRAPHS or options not in OPTIONS or bad:
        raise SystemExit(
            f"config {text!r}: want GRAPH:OPTIONS[+KEY=VALUE...] with GRAPH in {GRAPHS}, "
            f"OPTIONS in {OPTIONS}, KEY in {OVERRIDES}"
        )
    if options in ("backend", "pipeline") and graph != "iaprt":
        raise SystemExit(f"config {text!r}: {options} runs iap-rt's own model (iaprt:{options})")
    if "opt" in overrides and overrides["opt"] not in LEVELS:
        raise SystemExit(f"config {text!r}: opt= one of {', '.join(LEVELS)}")
    return {"config": text, "graph": graph, "options": options, "overrides": overrides}


# ---- the worker (one config, fresh process) ------------------------------------------------------
def memory_mb() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[{"VmRSS": "rss_mb", "VmHWM": "hwm_mb"}[key]] = round(int(line.split()[1]) / 1024, 1)
    return out


def apply_overrides(so, overrides: dict, network: str | None = None):
    import onnxruntime as ort

    for key, value in overrides.items():
        if key.startswith("vae") and network not in (None, "vae_decoder"):
            continue  # vae...: the VAE decoder's session only
        key = key.removeprefix("vae")
        if key == "spin":
            so.add_session_config_entry(SPIN, str(int(value)))
        elif key == "arena":
            so.enable_cpu_mem_arena = bool(int(value))
        elif key == "mempattern":
            so.enable_mem_pattern = bool(int(value))
        elif key == "opt":
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[value])
        elif key == "threads":
            so.intra_op_num_threads = int(value)
        elif key == "inter":
            so.inter_op_num_threads = int(value)
        elif key == "shared":  # the process's one CPU arena for every session
            if int(value):
                from iap_rt.backends.ort import register_shared_cpu_arena

                register_shared_cpu_arena()
            so.add_session_config_entry(SHARED, str(int(value)))
    return so


def make_options(cfg: dict, threads: int):
    """The SessionOptions of ``cfg`` (a fresh object per call, as the runtime makes them)."""
    import onnxruntime as ort

    from iap_rt.backends.ort import OrtBackend

    if cfg["options"] in ("runtime", "backend", "pipeline"):
        so = OrtBackend(device="cpu", threads=threads).session_options("vae_decoder")
    else:
        so = ort.SessionOptions()
        if cfg["options"] == "peers":
            so.intra_op_num_threads = threads
    return apply_overrides(so, cfg["overrides"], "vae_decoder")


def describe(session) -> dict:
    """The options a session actually runs with."""
    so = session.get_session_options()
    try:
        spin = so.get_session_config_entry(SPIN)
    except RuntimeError:  # not set: ONNX Runtime's default (spinning on)
        spin = "unset (default: 1)"
    try:
        shared = so.get_session_config_entry(SHARED)
    except RuntimeError:  # not set: each session grows its own arena
        shared = "unset (default: 0)"
    return {
        "graph_optimization_level": str(so.graph_optimization_level).rsplit(".", 1)[-1],
        "intra_op_num_threads": so.intra_op_num_threads,
        "inter_op_num_threads": so.inter_op_num_threads,
        "execution_mode": str(so.execution_mode).rsplit(".", 1)[-1],
        "enable_cpu_mem_arena": so.enable_cpu_mem_arena,
        "enable_mem_pattern": so.enable_mem_pattern,
        "enable_mem_reuse": so.enable_mem_reuse,
        "allow_spinning": spin,
        "use_env_allocators": shared,
        "log_severity_level": so.log_severity_level,
    }


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def worker(spec: dict) -> int:
    cfg, threads, calls = spec["cfg"], spec["threads"], spec["calls"]
    h = w = spec["size"] // 8
    z = (np.random.default_rng(0).standard_normal((1, 4, h, w)) / 0.18215).astype(np.float32)
    import onnxruntime as ort

    emit(stage="imported", **memory_mb())
    t0 = time.perf_counter()
    if cfg["options"] in ("backend", "pipeline"):
        from iap_rt.backends.ort import OrtBackend
        from iap_rt.modeldir import ModelDir
        from iap_rt.pipeline import Pipeline

        backend = OrtBackend(device="cpu", threads=threads)
        base = backend.session_options
        backend.session_options = lambda network=None: apply_overrides(
            base(network), cfg["overrides"], network
        )
        model = ModelDir.open(spec["iaprt_model"])
        pipe = Pipeline(model, backend, progress=False, memory_limit="off")
        runners = pipe.runners
        session = runners["vae_decoder"].session

        def decode(i):
            if cfg["options"] == "pipeline":
                r = pipe(f"{spec['prompt']} {i}", steps=spec["pipeline_steps"], seed=i,
                         guidance=7.5, height=spec["size"], width=spec["size"], scheduler="ddim")  # fmt: skip
                return r.timings.vae_decode_s, {"total_s": r.timings.total_s}
            t = time.perf_counter()
            runners["vae_decoder"].run({"latent_sample": z})
            return time.perf_counter() - t, {}
    else:
        session = ort.InferenceSession(spec["graphs"][cfg["graph"]], make_options(cfg, threads),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        name = session.get_inputs()[0].name

        def decode(i):
            t = time.perf_counter()
            session.run(None, {name: z})
            return time.perf_counter() - t, {}

    emit(stage="session", seconds=time.perf_counter() - t0, options=describe(session),
         inputs=[i.name for i in session.get_inputs()], **memory_mb())  # fmt: skip
    for i in range(calls):
        seconds, extra = decode(i)
        emit(stage="call", call=i + 1, seconds=seconds, **extra, **memory_mb())
    return 0


# ---- the parent ----------------------------------------------------------------------------------
def graph_paths(args) -> dict:
    from iap_rt.bench.sources import cache_root
    from iap_rt.modeldir import ModelDir

    work = cache_root(args.cache_dir, args.arch) / "peers"
    iaprt = Path(args.iaprt_model or work / "iaprt-model")
    optimum = Path(args.optimum_model or work / "optimum-model")
    paths = {"iaprt_model": str(iaprt)}
    if (iaprt / "manifest.json").is_file():
        paths["iaprt"] = str(ModelDir.open(iaprt).network_path("vae_decoder"))
    if (optimum / "vae_decoder" / "model.onnx").is_file():
        paths["optimum"] = str(optimum / "vae_decoder" / "model.onnx")
    return paths


def graph_facts(path: str) -> dict:
    """Opset and node counts by op type of an ONNX file (no weights read; needs onnx)."""
    try:
        import onnx
    except ImportError:
        return {"path": path, "note": "onnx is not installed: no graph facts"}
    m = onnx.load(path, load_external_data=False)
    ops: dict[str, int] = {}
    for node in m.graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    return {"path": path, "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
            "nodes": len(m.graph.node), "initializers": len(m.graph.initializer),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}  # fmt: skip


def run_config(args, cfg: dict, paths: dict) -> dict:
    spec = {"cfg": cfg, "threads": args.threads, "calls": args.calls, "size": args.size,
            "graphs": paths, "iaprt_model": paths["iaprt_model"], "prompt": "一幅山水画",
            "pipeline_steps": args.pipeline_steps}  # fmt: skip
    from iap_rt.bench.protocol import child_env

    proc = subprocess.run(
        [sys.executable, __file__, "_worker", json.dumps(spec)], capture_output=True, text=True,
        env=child_env(args.threads) | {"IAP_RT_THREADS": str(args.threads)},
        timeout=args.timeout,
    )  # fmt: skip
    events = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    row = {"config": cfg["config"], "rc": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:500]
    for e in events:
        stage = e.pop("stage")
        if stage == "call":
            row.setdefault("calls", []).append(e)
        else:
            row[stage] = e
    return row


def table(rows: list[dict]) -> str:
    out = ["config | session s, RSS MiB | call: seconds (RSS after / peak MiB) ..."]
    for r in rows:
        s = r.get("session") or {}
        head = f"{r['config']:<30} | {s.get('seconds', float('nan')):.2f} s, {s.get('rss_mb')}"
        cells = [
            f"{c['seconds']:.3f} ({c['rss_mb']:.0f}/{c['hwm_mb']:.0f})" for c in r.get("calls", [])
        ]
        out.append(
            f"{head} | " + "  ".join(cells) + (f"  ERROR {r['error']}" if "error" in r else "")
        )
    return "\n".join(out)


def medians(rows: list[dict]) -> dict:
    """Per config and call index: median seconds and RSS over the rounds."""
    out: dict = {}
    for r in rows:
        for c in r.get("calls", []):
            out.setdefault(r["config"], {}).setdefault(c["call"], []).append(c)
    return {
        cfg: {str(i): {"seconds": statistics.median(c["seconds"] for c in cs),
                       "rss_mb": statistics.median(c["rss_mb"] for c in cs),
                       "hwm_mb": statistics.median(c["hwm_mb"] for c in cs), "n": len(cs)}
              for i, cs in by_call.items()}
        for cfg, by_call in out.items()
    }  # fmt: skip


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:
        return worker(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=tuple(DEFAULT_SIZE), default="sd15")
    p.add_argument("--size", type=int, help="image side; default sd15 512, tiny 64")
    p.add_argument("--calls", type=int, default=4, help="consecutive decodes per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="times through the config list")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    p.add_argument("--pipeline-steps", type=int, default=2, help="steps per image of :pipeline")
    p.add_argument("--cache-dir", help="bench/peers.py's --cache-dir")
    p.add_argument("--iaprt-model", help="default: bench/peers.py's iap-rt export")
    p.add_argument("--optimum-model", help="default: bench/peers.py's optimum export")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    args.size = args.size or DEFAULT_SIZE[args.arch]
    configs = [parse_config(c.strip()) for c in args.configs.split(",") if c.strip()]
    paths = graph_paths(args)
    missing = sorted({c["graph"] for c in configs} - set(paths))
    if missing:
        raise SystemExit(
            f"no {' / '.join(missing)} export for {args.arch}: run `python bench/peers.py "
            f"--arch {args.arch} --prepare-only` first (same --cache-dir)"
        )
    from iap_rt.bench.machine import machine_info

    doc = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": shlex.join(["python", "bench/vae_gap.py", *argv]),
           "machine": machine_info(), "graphs": paths,
           "graph_facts": {g: graph_facts(paths[g]) for g in GRAPHS if g in paths},
           "config": {k: getattr(args, k) for k in ("arch", "size", "calls", "threads", "rounds",
                                                    "pipeline_steps")},
           "rows": []}  # fmt: skip
    for r in range(args.rounds):
        for cfg in configs if r % 2 == 0 else configs[::-1]:
            row = run_config(args, cfg, paths) | {"round": r}
            doc["rows"].append(row)
            print(table([row]), flush=True)
            if args.out:
                from iap_rt.fileio import write_json_atomic

                write_json_atomic(args.out, doc)
    doc["medians"] = medians(doc["rows"])
    if args.out:
        from iap_rt.fileio import write_json_atomic

        write_json_atomic(args.out, doc)
    print("\n" + table(doc["rows"]))
    return 0 if all(r["rc"] == 0 for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
