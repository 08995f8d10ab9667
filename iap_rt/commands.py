"""Runtime commands: ``generate``, ``info``, ``init`` (torch-free)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from iap_rt.config import GenerateConfig, resolve
from iap_rt.errors import InputError, OutputError

SCHEDULER_CHOICES = ("ddim", "euler", "dpm++")
BACKEND_CHOICES = ("auto", "ort", "trt")


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-blank line; must be UTF-8 and hold at least one prompt."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"prompts file {p} does not exist") from None
    except UnicodeDecodeError as e:
        raise InputError(
            f"prompts file {p} is not UTF-8 text (byte {e.start})",
            fix="save the file as UTF-8, one prompt per line.",
        ) from e
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {p} is empty", fix="write one prompt per line.")
    return prompts


@click.command("generate")
@click.argument("prompt", required=False)
@click.option("--model", help="Model directory (default: workspace, else the embedded model).")
@click.option("--negative", help="Negative prompt (what to steer away from).")
@click.option("--steps", type=int, help="Denoising steps, 1-1000 [25].")
@click.option(
    "--guidance", type=float, help="Classifier-free guidance scale; <= 1 disables it [7.5]."
)
@click.option("--seed", type=int, help="Seed of the first image; image i uses seed+i [0].")
@click.option(
    "--height",
    type=int,
    help="Image height in pixels, a multiple of VAE factor x 2^UNet down-samplings (64 for SD 1.5) [model's size].",
)
@click.option(
    "--width", type=int, help="Image width in pixels, same rule as --height [model's size]."
)
@click.option("--batch-size", type=int, help="Images per prompt [1].")
@click.option("--scheduler", help=f"One of {', '.join(SCHEDULER_CHOICES)} [model's default].")
@click.option("--backend", help=f"One of {', '.join(BACKEND_CHOICES)} [auto].")
@click.option("--out", help="Output .png (one image) or directory [outputs/].")
@click.option(
    "--prompts-file", type=click.Path(), help="Generate for every line of this UTF-8 file."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per image.")
@click.option(
    "--config", "config_path", type=click.Path(), help="Workspace TOML (default ./iap-rt.toml)."
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def generate(prompt, as_json, config_path, prompts_file, no_progress, **options):
    """Generate images for PROMPT (Chinese text) and write PNGs.

    \b
    Examples:
      iap-rt generate "山水画"
      iap-rt generate "左边有一个红色的圆" --steps 30 --seed 7 --out red.png
      iap-rt generate --prompts-file prompts.txt --batch-size 2 --out outputs/ --json

    PNGs carry their generation parameters in an iTXt chunk named "iap-rt".
    """
    from iap_rt.backends import get_backend
    from iap_rt.images import plan_outputs, save_png
    from iap_rt.modeldir import ModelDir, default_model_dir
    from iap_rt.pipeline import Pipeline

    cfg = resolve(GenerateConfig, "generate", config_path, options)
    if prompts_file:
        prompts = read_prompts_file(prompts_file)
    elif prompt is not None:
        prompts = [prompt]
    else:
        raise InputError(
            "no prompt given",
            fix='pass a prompt, e.g. iap-rt generate "山水画", or --prompts-file.',
        )
    if cfg.scheduler is not None and cfg.scheduler not in SCHEDULER_CHOICES:
        raise InputError(
            f"unknown scheduler {cfg.scheduler!r}",
            fix=f"use one of {', '.join(SCHEDULER_CHOICES)}.",
        )

    model = ModelDir.open(cfg.model or default_model_dir())
    backend = get_backend(cfg.backend, model)
    pipe = Pipeline(model, backend, progress=not (no_progress or as_json))
    kwargs = dict(
        negative_prompt=cfg.negative,
        steps=cfg.steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
        height=cfg.height if cfg.height is not None else pipe.default_size,
        width=cfg.width if cfg.width is not None else pipe.default_size,
        batch_size=cfg.batch_size,
        scheduler=cfg.scheduler or model.default_scheduler,
    )
    for p in prompts:  # every input is checked before any work or any file
        pipe.check_inputs(p, **kwargs)
    paths = iter(plan_outputs(cfg.out, len(prompts) * cfg.batch_size))

    for p in prompts:
        result = pipe(p, **kwargs)
        for image, seed in zip(result.images, result.seeds):
            params = dict(result.params, seed=seed)
            path = save_png(next(paths), image, params)
            if as_json:
                click.echo(json.dumps({"path": str(path), **params}, ensure_ascii=False))
            else:
                click.echo(f"wrote {path}")


@click.command("info")
@click.option("--model", type=click.Path(), help="Model directory (default: the embedded model).")
def info(model):
    """Show installed backends, execution providers, TensorRT and the model manifest."""
    import importlib.metadata

    from iap_rt.modeldir import ModelDir, default_model_dir
    from iap_rt.ortinfo import ort_status

    version = importlib.metadata.version("iap-rt")
    click.echo(f"iap-rt {version}  python {sys.version.split()[0]}")
    for line in ort_status().lines():  # the wheel, its providers, what CUDA lacks + the fix
        click.echo(line)
    trt = _tensorrt_flavours()
    click.echo("TensorRT: " + (", ".join(f"{k} {v}" for k, v in trt.items()) or "not installed"))
    opened = ModelDir.open(model or default_model_dir())
    click.echo(f"model: {opened.path}")
    click.echo(json.dumps(opened.manifest, indent=2, ensure_ascii=False))


def _tensorrt_flavours() -> dict:
    import importlib.metadata

    found = {}
    for flavour, dists in (
        ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")),
        ("tensorrt_rtx", ("tensorrt-rtx-cu13", "tensorrt-rtx", "tensorrt_rtx")),
    ):
        for d in dists:
            try:
                found[flavour] = importlib.metadata.version(d)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


@click.command("init")
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing iap-rt.toml.")
def init(directory, force):
    """Write a commented iap-rt.toml into DIRECTORY (default: here).

    With it, bare `iap-rt train`, `iap-rt export --fp16` and `iap-rt generate "山水画"`
    take their paths and settings from the workspace.
    """
    from iap_rt.config import WORKSPACE_FILE, render_toml
    from iap_rt.fileio import ensure_dir, write_text_atomic

    classes = {}
    for section, target in (
        ("train", "iap_rt.train.config:TrainConfig"),
        ("export", "iap_rt.export.config:ExportConfig"),
        ("engines", "iap_rt.engines.config:EngineConfig"),
    ):
        classes[section] = _import_config(target)
    classes["generate"] = GenerateConfig
    path = ensure_dir(directory) / WORKSPACE_FILE
    if path.exists() and not force:
        raise OutputError(f"{path} already exists", fix="pass --force to overwrite it.")
    write_text_atomic(path, render_toml({k: v for k, v in classes.items() if v is not None}))
    click.echo(f"wrote {path}")


def _import_config(target: str):
    """Import a stage's config dataclass (pure Python; the stage's heavy deps stay unloaded)."""
    import importlib

    mod, attr = target.split(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError):
        return None
