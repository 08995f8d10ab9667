"""The peers' side of ``bench/peers.py``: one fresh process per run, under the peer's own
interpreter. Standalone on purpose (stdlib, numpy, torch, diffusers, optimum; never
``iap_rt``), because optimum-onnx runs in its own venv (it pins transformers 4.57):

    python peers_worker.py optimum SPEC_JSON     # optimum-onnx's ORTStableDiffusionPipeline
    python peers_worker.py diffusers SPEC_JSON   # diffusers' torch fp32 StableDiffusionPipeline
    python peers_worker.py check-text-encoder DIR  # CLIPTextModel loads with no new weights?
    python peers_worker.py versions              # versions of what this interpreter has

``SPEC_JSON`` (written by ``peers.py``): ``model_dir``, ``prompts`` (one image each, in one
process), ``steps``, ``guidance``, ``height``, ``width``, ``seed``, ``threads``, ``out_dir``.
A run prints one JSON line per event to stdout, flushed at once, so that the parent can time
them: ``{"event": "loaded", ...}``, then ``{"event": "image", ...}`` after each image's PNG is
on disk, then ``{"event": "done", "vmhwm_mb": ...}``.

Stages are timed inside each tool without changing what it runs: for optimum, a wrapper
around each ONNX Runtime session's ``run`` (``unet``, ``vae_decoder``, ``text_encoder``); for
diffusers, forward pre/post hooks on ``unet`` and ``text_encoder`` and a wrapper around
``vae.decode``. ``unet_s`` is one entry per UNet call (one per step: guidance batches the
unconditional and conditional halves into one call of batch 2).
"""

from __future__ import annotations

import json
import os
import sys
import time

T_START = time.perf_counter()

VERSION_PACKAGES = (
    "optimum-onnx",
    "optimum",
    "onnxruntime",
    "transformers",
    "diffusers",
    "torch",
    "numpy",
)


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def vmhwm_mb() -> float | None:
    """This process's peak resident set size (VmHWM) in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class Stages:
    """Seconds per call of each timed stage, collected per image."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}

    def reset(self) -> None:
        self.calls = {"text_encoder": [], "unet": [], "vae_decode": []}

    def add(self, stage: str, seconds: float) -> None:
        self.calls.setdefault(stage, []).append(seconds)

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - t0)

        return timed


def load_optimum(spec: dict, stages: Stages):
    import onnxruntime as ort
    from diffusers import DDIMScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(spec["threads"])  # everything else: ONNX Runtime's defaults
    pipe = ORTStableDiffusionPipeline.from_pretrained(
        spec["model_dir"], export=False, session_options=so
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    parts = {"unet": pipe.unet, "vae_decode": pipe.vae.decoder, "text_encoder": pipe.text_encoder}
    for stage, part in parts.items():
        session = part.session
        session.run = stages.wrap(stage, session.run)
        session.run_with_iobinding = stages.wrap(stage, session.run_with_iobinding)
    info = {
        "io_binding": {k: bool(p.use_io_binding) for k, p in parts.items()},
        "session_options": session_summary(pipe.unet.session),
    }
    return pipe, time.perf_counter() - t0, info


def session_summary(session) -> dict:
    so = session.get_session_options()
    return {
        "graph_optimization_level": str(so.graph_optimization_level).rsplit(".", 1)[-1],
        "intra_op_num_threads": so.intra_op_num_threads,
        "inter_op_num_threads": so.inter_op_num_threads,
        "enable_cpu_mem_arena": so.enable_cpu_mem_arena,
        "enable_mem_pattern": so.enable_mem_pattern,
        "providers": session.get_providers(),
    }


def load_diffusers(spec: dict, stages: Stages):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        spec["model_dir"], torch_dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False, feature_extractor=None,
    )  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for stage, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        starts = []
        module.register_forward_pre_hook(lambda *_, s=starts: s.append(time.perf_counter()))
        module.register_forward_hook(
            lambda *_, s=starts, st=stage: stages.add(st, time.perf_counter() - s.pop())
        )
    pipe.vae.decode = stages.wrap("vae_decode", pipe.vae.decode)
    info = {"attention": type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))])
            .__name__}  # fmt: skip
    return pipe, time.perf_counter() - t0, info


def run(tool: str, spec_file: str) -> int:
    with open(spec_file, encoding="utf-8") as f:
        spec = json.load(f)
    threads = int(spec["threads"])
    import torch  # both tools run diffusers' pipeline code (scheduler, guidance) in torch

    torch.set_num_threads(threads)
    import_s = time.perf_counter() - T_START
    stages = Stages()
    load = {"optimum": load_optimum, "diffusers": load_diffusers}[tool]
    pipe, load_s, info = load(spec, stages)
    pipe.set_progress_bar_config(disable=True)
    emit("loaded", import_s=import_s, load_s=load_s, info=info, versions=versions())
    os.makedirs(spec["out_dir"], exist_ok=True)
    for i, prompt in enumerate(spec["prompts"]):
        stages.reset()
        generator = torch.Generator().manual_seed(int(spec["seed"]))
        t0 = time.perf_counter()
        image = pipe(
            prompt, num_inference_steps=int(spec["steps"]), guidance_scale=float(spec["guidance"]),
            height=int(spec["height"]), width=int(spec["width"]), generator=generator,
        ).images[0]  # fmt: skip
        total_s = time.perf_counter() - t0
        path = os.path.join(spec["out_dir"], f"{i:05d}.png")
        image.save(path)
        calls = stages.calls
        emit(
            "image", index=i, path=path,
            timings={
                "text_encoder_s": sum(calls["text_encoder"]),
                "text_encoder_calls": len(calls["text_encoder"]),
                "unet_step_s": calls["unet"],
                "vae_decode_s": sum(calls["vae_decode"]),
                "total_s": total_s,
            },
            vmhwm_mb=vmhwm_mb(),
        )  # fmt: skip
    emit("done", vmhwm_mb=vmhwm_mb())
    return 0


def check_text_encoder(path: str) -> int:
    """Load the CLIP text encoder at ``path`` as this interpreter's transformers does; exit 1
    (with the keys) when any weight is missing from the file (transformers then initialises
    it at random and only logs a warning) or any stored weight goes unused."""
    import transformers
    from transformers import CLIPTextModel

    _, info = CLIPTextModel.from_pretrained(path, output_loading_info=True)
    bad = {k: list(v) for k, v in info.items() if k != "error_msgs" and v}
    emit("text_encoder_check", ok=not bad, transformers=transformers.__version__, problems=bad)
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["versions"]:
        emit("versions", versions=versions())
        return 0
    if argv[:1] == ["check-text-encoder"] and len(argv) == 2:
        return check_text_encoder(argv[1])
    if argv[:1] in (["optimum"], ["diffusers"]) and len(argv) == 2:
        return run(argv[0], argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
