"""The parent process of ``iap-rt bench``: sources -> one worker per backend -> the result
document (machine, config, results, skipped, notes, command; see :mod:`iap_rt.bench`).

Each worker runs under its backend's time limit (``--timeout``), and with ``out`` the document
is written (atomically) after every backend, ``"complete": false`` until the last one: a hang
or a killed session keeps what was measured."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from iap_rt.bench.config import NEGATIVE_PROMPT, PROMPT, TORCH_BACKENDS, BenchConfig
from iap_rt.bench.machine import loadavg, machine_info
from iap_rt.bench.protocol import WorkerSpec, spawn_worker
from iap_rt.bench.report import UNITS, notes, precision_notes
from iap_rt.bench.sources import arch_size, prepare_sources
from iap_rt.bench.stats import add_ratios, summarise
from iap_rt.fileio import write_json_atomic
from iap_rt.modeldir import ModelDir
from iap_rt.requests import PromptRequest, resolve


def run_bench(cfg: BenchConfig, command: str = "", log=print, out=None) -> dict:
    """Run every requested backend; return the result document (see :mod:`iap_rt.bench`),
    written to ``out`` (if given) after each backend."""
    cfg.check()
    machine = machine_info()
    sources = prepare_sources(cfg, log=log)
    model = ModelDir.open(sources.model_dir)
    height, width = arch_size(cfg)
    request = resolve(model, PromptRequest(
        PROMPT, NEGATIVE_PROMPT, cfg.seed, cfg.guidance, cfg.batch_size, None, cfg.steps,
        height, width, cfg.scheduler,
    ))  # fmt: skip
    height, width, scheduler = request.height, request.width, request.scheduler
    do_cfg = request.guided
    config = {
        "arch": cfg.arch,
        "height": height,
        "width": width,
        "steps": cfg.steps,
        "also_steps": cfg.more_steps(),
        "batch_size": cfg.batch_size,
        "repeat": cfg.repeat,
        "warmup": cfg.warmup,
        "guidance": float(cfg.guidance),
        "unet_batch": 2 * cfg.batch_size if do_cfg else cfg.batch_size,
        "scheduler": scheduler,
        "seed": cfg.seed,
        "threads": cfg.threads or os.cpu_count(),
        "device": cfg.device,
        "backends": list(cfg.backends),
        "timeout_s": {b: cfg.timeout_for(b) for b in cfg.backends},
        "deadline": cfg.deadline,
        "model_id": model.model_id,
        "precision": {n: model.precision(n) for n in model.manifest["networks"]},
        "model_dir": str(sources.model_dir),
        "model_build_s": sources.build_s,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
    }

    def document(results, skipped, outputs, complete: bool) -> dict:
        results = [dict(r) for r in results]  # ratios on copies: the runs go on
        add_ratios(results, outputs["latents"], outputs["images"])
        machine["loadavg_end"] = loadavg()
        return {
            "machine": machine,
            "config": config,
            "results": results,
            "skipped": list(skipped),
            "notes": notes(cfg) + precision_notes(results),
            "complete": complete,
            "command": command,
            "units": UNITS,
        }

    results, skipped, outputs = [], [], {"latents": {}, "images": {}}
    with tempfile.TemporaryDirectory(prefix="iap-rt-bench-") as tmp:
        keep = Path(os.path.abspath(cfg.keep_outputs or tmp))
        keep.mkdir(parents=True, exist_ok=True)
        for backend in dict.fromkeys(cfg.backends):
            if backend in TORCH_BACKENDS and sources.torch_unavailable:
                skipped.append({"backend": backend, "reason": sources.torch_unavailable})
                log(f"{backend}: skipped ({sources.torch_unavailable})")
                continue
            timeout = cfg.timeout_for(backend)
            if cfg.deadline is not None:
                left = cfg.deadline - time.time()
                if left <= 0:
                    reason = f"the bench's deadline passed {-left:.0f} s before it could start"
                    skipped.append({"backend": backend, "reason": reason, "deadline": True})
                    log(f"{backend}: skipped ({reason})")
                    continue
                timeout = left if timeout is None else min(timeout, left)
            spec = WorkerSpec(
                backend=backend,
                # absolute: the worker runs in the temporary directory (spawn_worker)
                model_dir=os.path.abspath(sources.model_dir),
                base_dir=os.path.abspath(sources.base_dir) if sources.base_dir else None,
                encoder_dir=os.path.abspath(sources.encoder_dir) if sources.encoder_dir else None,
                height=height,
                width=width,
                steps=cfg.steps,
                batch_size=cfg.batch_size,
                guidance=float(cfg.guidance),
                scheduler=scheduler,
                seed=cfg.seed,
                repeat=cfg.repeat,
                warmup=cfg.warmup,
                threads=cfg.threads,
                device=cfg.device,
                latents_out=str(keep / f"{backend}.latents.npy"),
                images_out=str(keep / f"{backend}.images.npy"),
                more_steps=cfg.more_steps(),
                ort_unet=cfg.ort_unet,
            )
            for stale in (spec.latents_out, spec.images_out):  # never another run's outputs
                Path(stale).unlink(missing_ok=True)
            log(f"{backend}: measuring ({cfg.warmup} warm-up + {cfg.repeat} runs) ...")
            raw = spawn_worker(spec, Path(tmp), cfg.threads, timeout)
            if raw.get("status") in ("unavailable", "error"):
                skip = {"backend": backend, "reason": raw["reason"]}
                skip["error"] = raw["status"] == "error"
                if raw.get("timed_out"):
                    skip["timed_out"] = True
                if raw.get("log"):
                    skip["log"] = raw["log"]
                skipped.append(skip)
                log(f"{backend}: {raw['status']} ({raw['reason']})")
            else:
                results.append(summarise(raw))
                for kind, path in (("latents", spec.latents_out), ("images", spec.images_out)):
                    if Path(path).is_file():
                        outputs[kind][backend] = np.load(path)
            if out:
                write_json_atomic(out, document(results, skipped, outputs, complete=False))
    doc = document(results, skipped, outputs, complete=True)
    if out:
        write_json_atomic(out, doc)
    return doc
