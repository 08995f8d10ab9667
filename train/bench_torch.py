"""``iap-rt bench``'s torch side, each part run in its own process by the torch-free parent
(:mod:`iap_rt.bench`):

    python -m iap_rt.train.bench_torch worker SPEC_JSON RESULT_JSON   # torch, torch-compile
    python -m iap_rt.train.bench_torch build ARCH ROOT                # tiny | sd15 sources

- ``worker``: the reference backends, :class:`iap_rt.train.torch_pipeline.TorchPipeline` in eager
  PyTorch (fp32 on CPU; fp16 with diffusers' default SDPA attention on CUDA, the VAE at the
  model directory's VAE precision so that the VAE decode is compared like for like, and
  timed at fp16 and fp32 both), optionally the UNet under ``torch.compile``; measured by
  :func:`iap_rt.bench.protocol.measure` like every other backend.
- ``build``: ``ROOT/sd`` (a diffusers base without the CLIP text encoder, which the reference
  does not use) and ``ROOT/encoder`` (a ``chinese_encoder/``) with random seeded weights from
  the configs in :mod:`iap_rt.train.tiny` / :mod:`iap_rt.train.sd15`, each marked complete
  once written; the parent then exports them with ``iap-rt export``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from iap_rt.bench.config import BUILD_SEED, CACHE_LAYOUT, TORCH_BACKENDS
from iap_rt.bench.protocol import LoadedBackend, RunTimes, WorkerSpec, worker_main
from iap_rt.errors import BackendUnavailableError, ConfigError
from iap_rt.extras import install_hint
from iap_rt.fileio import write_text_atomic
from iap_rt.modeldir import ModelDir

BUILDABLE = ("tiny", "sd15")


def torch_dtype(precision: str):
    """``"fp16"``/``"fp32"`` -> the torch dtype."""
    import torch

    return {"fp16": torch.float16, "fp32": torch.float32}[precision]


def load_torch(spec: WorkerSpec) -> LoadedBackend:
    """The torch reference for ``spec``, loaded inside the cold-start clock."""
    if spec.backend not in TORCH_BACKENDS:
        raise ConfigError(f"{spec.backend!r} is not a torch backend ({', '.join(TORCH_BACKENDS)})")
    if not spec.base_dir or not spec.encoder_dir:
        raise BackendUnavailableError(
            "the torch reference has no PyTorch sources",
            fix="pass --base and --encoder with --model (the directories it was exported from).",
        )
    try:
        import diffusers  # noqa: F401 - imported before the cold-start clock starts
        import torch

        from iap_rt.train.torch_pipeline import TorchPipeline
    except ImportError as e:
        raise BackendUnavailableError(
            f"the torch reference needs torch and diffusers ({e})",
            fix=install_hint("export") + ".",
        ) from e

    load_start = time.perf_counter()
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            "torch has no CUDA device (CPU-only build or no GPU)",
            fix="run with --device cpu, or install a CUDA build of torch on a GPU machine.",
        )
    cuda = spec.device in ("auto", "cuda") and torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    vae_precision = ModelDir.open(spec.model_dir).precision("vae_decoder") if cuda else "fp32"
    vae_dtype = torch_dtype(vae_precision)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    ref = TorchPipeline.from_dirs(
        spec.model_dir, spec.base_dir, spec.encoder_dir, dev, dtype, vae_dtype=vae_dtype
    )
    compiled = spec.backend == "torch-compile"
    if compiled:
        ref.unet = torch.compile(ref.unet)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        name = torch.cuda.get_device_name(dev)
        device = f"cuda ({name}, fp16, {vae_precision} VAE, SDPA"
        device += f"{', torch.compile' if compiled else ''})"
    else:
        device = f"cpu (fp32, eager{', torch.compile' if compiled else ''})"

    last = {}

    def generate(steps: int):
        args, kwargs = spec.pipeline_args(steps)
        res = ref(*args, **kwargs)
        last["latents"] = res.latents
        times = RunTimes.from_timings(res.timings, res.timings.unet_cpu_s)
        return times, res.latents, res.images

    def peak_gpu_mb() -> float | None:
        return torch.cuda.max_memory_reserved() / 2**20 if cuda else None

    def extra() -> dict:  # after the runs (and the peak memory): the VAE at both precisions
        prec = "fp16" if dtype == torch.float16 else "fp32"
        out = {"precision": {"text_encoder": prec, "unet": prec, "vae_decoder": vae_precision}}
        if cuda:  # fp16 vs fp32 VAE decode matters on a GPU only
            out["vae_decode_by_precision"] = vae_decode_by_precision(ref, last["latents"])
        return out

    return LoadedBackend(generate, device, load_start, peak_gpu_mb=peak_gpu_mb, extra=extra)


def vae_decode_by_precision(ref, latents, precisions=("fp16", "fp32"), repeat: int = 3) -> dict:
    """Median seconds of ``ref``'s VAE decode of ``latents`` (numpy, the final latents) in each
    precision (a copy of the VAE cast to it; the pipeline's own VAE is left as it was)."""
    import copy
    import statistics

    import torch

    own, own_dtype = ref.vae, ref.vae_dtype
    z = torch.from_numpy(latents).to(ref.device)
    out = {}
    try:
        for p in precisions:
            dt = torch_dtype(p)
            ref.vae = own if dt == own_dtype else copy.deepcopy(own).to(dt)
            ref.vae_dtype = dt
            times = []
            for _ in range(repeat + 1):  # the first decode warms the kernels up
                ref.sync()
                t0 = time.perf_counter()
                ref.decode(z)
                ref.sync()
                times.append(time.perf_counter() - t0)
            out[p] = statistics.median(times[1:])
    finally:
        ref.vae, ref.vae_dtype = own, own_dtype
    return out


def build_sources(arch: str, root: str | os.PathLike) -> Path:
    """Write ``root/sd`` and ``root/encoder`` for ``arch`` (random weights, seed
    ``BUILD_SEED``), each once: a ``.complete`` marker is written after it."""
    root = Path(root)
    if arch == "tiny":
        from iap_rt.train.tiny import make_tiny_encoder, make_tiny_sd

        make_sd, make_encoder = make_tiny_sd, make_tiny_encoder
    elif arch == "sd15":
        from iap_rt.train.sd15 import make_sd15, make_sd15_encoder

        def make_sd(out, seed):  # the reference needs no CLIP text encoder
            return make_sd15(out, seed, text_encoder=False)

        make_encoder = make_sd15_encoder
    else:
        raise ConfigError(
            f"arch {arch!r} cannot be built from configs", fix=f"use one of {', '.join(BUILDABLE)}."
        )
    for sub, make in (("sd", make_sd), ("encoder", make_encoder)):
        if not (root / sub / ".complete").is_file():
            shutil.rmtree(root / sub, ignore_errors=True)
            make(root / sub, seed=BUILD_SEED)
            write_text_atomic(root / sub / ".complete", f"layout {CACHE_LAYOUT}\n")
    return root


def main(argv: list[str]) -> int:
    """``worker SPEC_JSON RESULT_JSON`` | ``build ARCH ROOT``."""
    if argv[:1] == ["worker"] and len(argv) == 3:
        return worker_main(argv[1], argv[2], load_torch)
    if argv[:1] == ["build"] and len(argv) == 3:
        build_sources(argv[1], argv[2])
        return 0
    print(
        "usage: python -m iap_rt.train.bench_torch worker SPEC_JSON RESULT_JSON | build ARCH ROOT",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
