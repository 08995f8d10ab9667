"""Runtime commands: ``generate``, ``info``, ``init`` (torch-free)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from iap_rt.config import GenerateConfig, ServeConfig, load_config
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
    "--guidance",
    type=float,
    help="Classifier-free guidance scale, 0-100; <= 1 disables it [the model's default: 7.5 "
    "for SD, 3 for the embedded toy model].",
)
@click.option(
    "--seed", type=int, help="Seed of the first image, 0 to 2**63-1; image i uses seed+i [0]."
)
@click.option(
    "--height",
    type=int,
    help="Image height in pixels, a multiple of VAE factor x 2^UNet down-samplings (64 for SD 1.5) [model's size].",
)
@click.option(
    "--width", type=int, help="Image width in pixels, same rule as --height [model's size]."
)
@click.option("--batch-size", type=int, help="Images per prompt [1].")
@click.option(
    "--chunk-size", type=int, help="Images per UNet batch; larger batches run as several [8]."
)
@click.option(
    "--memory-limit",
    help="Refuse a call whose estimated peak memory exceeds this: auto (90% of what is "
    "available), a size like 12GB, or off [auto].",
)
@click.option("--scheduler", help=f"One of {', '.join(SCHEDULER_CHOICES)} [model's default].")
@click.option("--backend", help=f"One of {', '.join(BACKEND_CHOICES)} [auto].")
@click.option(
    "--out",
    help="One image: a .png, .jpg, .jpeg or .webp file; else a directory of numbered PNGs "
    "[outputs/].",
)
@click.option(
    "--prompts-file", type=click.Path(), help="Generate for every line of this UTF-8 file."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per image.")
@click.option(
    "--config", "config_path", type=click.Path(), help="Workspace TOML (default ./iap-rt.toml)."
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--server",
    help="Generate through a running `iap-rt serve` at this URL (e.g. http://127.0.0.1:8000): "
    "same flags, same PNGs. API key from $IAP_RT_API_KEY.",
)
def generate(prompt, as_json, config_path, prompts_file, no_progress, server, **options):
    """Generate images for PROMPT (Chinese text) and write them.

    \b
    Examples:
      iap-rt generate "山水画"
      iap-rt generate "左边有一个红色的圆" --steps 30 --seed 7 --out red.png
      iap-rt generate --prompts-file prompts.txt --batch-size 2 --out outputs/ --json
      iap-rt generate "山水画" --server http://127.0.0.1:8000

    Images carry their generation parameters: PNG in an iTXt chunk named "iap-rt", JPEG and
    WebP in an XMP packet. Each image is written as soon as its UNet batch is done.
    """
    from iap_rt.backends import get_backend
    from iap_rt.images import plan_outputs, save_image
    from iap_rt.modeldir import ModelDir, default_model_dir
    from iap_rt.pipeline import Pipeline
    from iap_rt.requests import PromptRequest, resolve

    cfg = load_config(GenerateConfig, "generate", config_path, options)
    if prompts_file and prompt is not None:
        raise InputError(
            "both a PROMPT and --prompts-file were given",
            fix="pass one: the prompt, or --prompts-file (one prompt per line).",
        )
    if prompts_file:
        prompts = read_prompts_file(prompts_file)
    elif prompt is not None:
        prompts = [prompt]
    else:
        raise InputError(
            "no prompt given",
            fix='pass a prompt, e.g. iap-rt generate "山水画", or --prompts-file.',
        )

    if server:  # the server's model and backend; same PNGs as a local run on them
        from iap_rt.client import generate_remote

        given = [f"--{k}" for k in ("model", "backend") if options.get(k) is not None]
        if given:
            raise InputError(f"{' and '.join(given)} cannot be used with --server",
                             fix="the server chooses its model and backend; drop them.")  # fmt: skip
        return generate_remote(
            server, prompts, cfg, as_json, click.echo, lambda m: click.echo(m, err=True)
        )

    model = ModelDir.open(cfg.model or default_model_dir())
    pipe = Pipeline(
        model,
        get_backend(cfg.backend, model),
        progress=not (no_progress or as_json),
        chunk_size=cfg.chunk_size,
        memory_limit=cfg.memory_limit,
    )
    # every request resolved (the model's defaults, every rule: iap_rt.requests), the memory
    # of one call and the destination checked before any work
    requests = [
        resolve(model, PromptRequest(p, cfg.negative, cfg.seed, cfg.guidance, cfg.batch_size,
                                     None, cfg.steps, cfg.height, cfg.width, cfg.scheduler))
        for p in prompts
    ]  # fmt: skip
    pipe.check_memory(pipe.plan_call([requests[0].part(0, min(cfg.batch_size, pipe.chunk_size))]))
    paths = plan_outputs(cfg.out, len(prompts) * cfg.batch_size)
    for text in dict.fromkeys(r.notice for r in requests if r.notice):
        click.echo(text, err=True)

    # one call per chunk: memory stays bounded and each image is on disk once its batch is
    # done (image i of a batch is seed + i generated alone, so the split changes nothing)
    for request in requests:
        for start in range(0, request.batch_size, pipe.chunk_size):
            n = min(pipe.chunk_size, request.batch_size - start)
            result = pipe.generate([request.part(start, n)])[0]
            for image, seed in zip(result.images, result.seeds):
                params = dict(result.params, seed=seed)
                path = save_image(next(paths), image, params)
                if as_json:
                    click.echo(json.dumps({"path": str(path), **params}, ensure_ascii=False))
                else:
                    click.echo(f"wrote {path}")


@click.command("info")
@click.option("--model", type=click.Path(), help="Model directory (default: the embedded model).")
def info(model):
    """Show installed backends, TensorRT, the model manifest, its integrity and leftovers."""
    import importlib.metadata

    from iap_rt.errors import ArtifactMismatchError
    from iap_rt.fileio import leftovers, lock_holder
    from iap_rt.modeldir import ModelDir, default_model_dir
    from iap_rt.ortinfo import ort_status

    version = importlib.metadata.version("iap-rt")
    click.echo(f"iap-rt {version}  python {sys.version.split()[0]}")
    for line in ort_status().lines():  # the wheel, its providers, what CUDA lacks + the fix
        click.echo(line)
    trt = _tensorrt_flavours()
    click.echo("TensorRT: " + (", ".join(f"{k} {v}" for k, v in trt.items()) or "not installed"))
    path = Path(model or default_model_dir())
    opened = ModelDir.open(path, verify=False, clean=False)
    click.echo(f"model: {opened.path}")
    holder = lock_holder(path)
    for p in leftovers(path):
        state = (
            f"in use by a running export, pid {holder}"
            if holder
            else "left by a killed export; the next generate, export or engines run on this "
            "model removes it"
        )
        click.echo(f"leftover: {p} ({_du(p) / 1e6:.1f} MB, {state})")
    try:
        hashed = opened.verify()
        files = opened.recorded_hashes()
        how = f"hashed {len(hashed)} now" if hashed else "unchanged since verified"
        click.echo(f"integrity: {len(files)} network file(s) match the manifest ({how})")
    except ArtifactMismatchError as e:
        click.echo(f"integrity: FAILED: {e}")
    click.echo(json.dumps(opened.manifest, indent=2, ensure_ascii=False))


def _du(path: Path) -> int:
    """Bytes under ``path`` (files only; vanished entries count 0)."""
    total = 0
    for p in path.rglob("*") if path.exists() else ():
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            continue
    return total


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
    classes["serve"] = ServeConfig
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
