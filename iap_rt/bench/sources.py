"""What ``iap-rt bench`` runs: the model directory of the runtime backends and the PyTorch
sources (diffusers base, ``chinese_encoder/``) of the torch reference.

``tiny`` and ``sd15`` are built once into a cache, by two processes that hand over through
files: ``python -m iap_rt.train.bench_torch build`` writes ``sd/`` and ``encoder/`` (random
seeded weights, torch), then ``iap-rt export`` writes ``model-<precision>/``. This module
only starts them; it imports no torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from iap_rt.bench.config import BUILD_SEED, DEFAULT_SIZE, BenchConfig
from iap_rt.bench.protocol import child_env, last_line
from iap_rt.errors import ArtifactError, ArtifactNotFoundError, IapRtError
from iap_rt.extras import install_hint
from iap_rt.modeldir import ModelDir


@dataclass
class Sources:
    """What the backends load: the model directory and the PyTorch sources of the reference."""

    model_dir: Path
    base_dir: Path | None = None
    encoder_dir: Path | None = None
    build_s: float | None = None  # seconds spent building the cache in this run (None: hit)
    torch_unavailable: str | None = None  # why the torch reference cannot run, if it cannot


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/iap-rt/bench`` (``~/.cache/iap-rt/bench``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "iap-rt" / "bench"


def cache_root(cache_dir: str | os.PathLike | None, arch: str) -> Path:
    """Where the built ``arch`` lives: ``sd/``, ``encoder/``, ``model-fp32/``, ``model-fp16/``,
    ``model-fp16-vae16/``."""
    return Path(cache_dir or default_cache_dir()) / f"{arch}-seed{BUILD_SEED}"


def model_ok(path: Path) -> bool:
    """Whether ``path`` is a complete model directory (export writes the manifest last)."""
    try:
        ModelDir.open(path)
        return True
    except ArtifactError:
        return False


def prepare_sources(cfg: BenchConfig, log=print) -> Sources:
    """Resolve (building into the cache when needed) what every backend will load."""
    if cfg.model is not None:
        return _given_sources(cfg)
    if cfg.arch == "toy":
        return _toy_sources()
    precision = ("fp16" if cfg.fp16 else "fp32") + ("-vae16" if cfg.fp16_vae else "")
    root = cache_root(cfg.cache_dir, cfg.arch)
    sources = Sources(root / f"model-{precision}", root / "sd", root / "encoder")
    if model_ok(sources.model_dir) and all(
        (d / ".complete").is_file() for d in (sources.base_dir, sources.encoder_dir)
    ):
        return sources
    log(
        f"building the {cfg.arch} model ({precision}, random weights, seed {BUILD_SEED}) in "
        f"{root} (once; sd15 takes minutes and ~8 GB of disk)"
    )
    t0 = time.perf_counter()
    build = [sys.executable, "-m", "iap_rt.train.bench_torch", "build", cfg.arch, str(root)]
    _run_step(build, f"building the {cfg.arch} PyTorch sources", cfg.threads, root.parent)
    if not model_ok(sources.model_dir):
        shutil.rmtree(sources.model_dir, ignore_errors=True)
        # run in the cache, so that no workspace iap-rt.toml changes what is exported
        export = [sys.executable, "-m", "iap_rt.cli", *export_args(cfg, sources)]
        _run_step(export, f"exporting the {cfg.arch} benchmark model", cfg.threads, root)
    sources.build_s = time.perf_counter() - t0
    return sources


def export_args(cfg: BenchConfig, sources: Sources) -> list[str]:
    """``iap-rt`` arguments that export the built sources into ``sources.model_dir``."""
    return [
        "export",
        *("--base", str(sources.base_dir), "--encoder", str(sources.encoder_dir)),
        *("--out", str(sources.model_dir), "--model-id", f"{cfg.arch}-random-seed{BUILD_SEED}"),
        *("--engines", "none", "--fp16" if cfg.fp16 else "--no-fp16"),
        "--fp16-vae" if cfg.fp16_vae else "--no-fp16-vae",
    ]


def _run_step(cmd: list[str], what: str, threads: int | None, cwd: Path) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise IapRtError(
            f"{what} failed: {last_line(proc.stderr)}",
            fix=f"{install_hint('export')}; or pass --model DIR of an exported model directory.",
        )


def _given_sources(cfg: BenchConfig) -> Sources:
    model = ModelDir.open(cfg.model)
    m = model.manifest
    base = cfg.base or m.get("base_model")
    encoder = cfg.encoder or m.get("encoder") or m.get("encoder_dir")
    sources = Sources(Path(cfg.model))
    missing = [
        name
        for name, path, sub in (("--base", base, "unet"), ("--encoder", encoder, "config.json"))
        if not path or not (Path(path) / sub).exists()
    ]
    if missing:
        sources.torch_unavailable = (
            f"the torch reference needs the PyTorch sources of {cfg.model}: pass "
            f"{' and '.join(missing)} (the diffusers base and chinese_encoder/ it was "
            "exported from)"
        )
    else:
        sources.base_dir, sources.encoder_dir = Path(base), Path(encoder)
    return sources


def _toy_sources() -> Sources:
    from iap_rt.modeldir import default_model_dir, default_model_sources

    embedded = ModelDir.open(default_model_dir())
    if embedded.model_id.startswith("toy"):
        base, encoder = default_model_sources()  # the PyTorch sources it was exported from
        return _given_sources(
            BenchConfig(arch="toy", model=str(embedded.path), base=str(base), encoder=str(encoder))
        )
    raise ArtifactNotFoundError(
        "no toy-world model is available: the toy model has not been trained yet (the "
        f"embedded model is {embedded.model_id!r})",
        fix="train and export one (iap-rt toy base ..., iap-rt train ..., iap-rt export ...) "
        "and pass --model DIR [--base BASE_DIR --encoder ENCODER_DIR].",
    )


def arch_size(cfg: BenchConfig) -> tuple[int | None, int | None]:
    """(height, width) the bench asks for: the options, else the arch's default size (tiny,
    sd15); None: the model's own (:func:`iap_rt.requests.resolve` fills it)."""
    default = None if cfg.model is not None else DEFAULT_SIZE.get(cfg.arch)
    return cfg.height or default, cfg.width or default
