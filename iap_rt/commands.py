"""Runtime commands: ``generate``, ``info``, ``init`` (torch-free)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from iap_rt.config import GenerateConfig, ServeConfig, config_options, load_config
from iap_rt.errors import InputError, OutputError


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
@config_options(GenerateConfig)
@click.option(
    "--prompts-file", type=click.Path(), help="Generate for every line of this UTF-8 file."
)
@click.option(
    "--image",
    "image_path",
    type=click.Path(),
    help="Edit this image (PNG, JPEG, WebP) with the prompt instead of drawing from noise "
    "(image to image; the output has its size, or --height/--width, to which it is resized).",
)
@click.option(
    "--mask",
    "mask_path",
    type=click.Path(),
    help="With --image: repaint only the white region of this mask (inpainting; black = "
    "keep: those pixels stay the image's own).",
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
def generate(
    prompt,
    as_json,
    config_path,
    prompts_file,
    image_path,
    mask_path,
    no_progress,
    server,
    **options,
):
    """Generate images for PROMPT (Chinese text) and write them.

    \b
    Examples:
      iap-rt generate "山水画"
      iap-rt generate "左边有一个红色的圆" --steps 30 --seed 7 --out red.png
      iap-rt generate --prompts-file prompts.txt --batch-size 2 --out outputs/ --json
      iap-rt generate "山水画" --server http://127.0.0.1:8000
      iap-rt generate "右边有一个蓝色的十字" --image scene.png --mask right.png --out edit.png

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

    image, mask = _edit_inputs(image_path, mask_path, cfg)
    if server:  # the server's model and backend; same PNGs as a local run on them
        from iap_rt.client import generate_remote

        given = [f"--{k}" for k in ("model", "backend") if options.get(k) is not None]
        if given:
            raise InputError(f"{' and '.join(given)} cannot be used with --server",
                             fix="the server chooses its model and backend; drop them.")  # fmt: skip
        return generate_remote(
            server,
            prompts,
            cfg,
            as_json,
            click.echo,
            lambda m: click.echo(m, err=True),
            image,
            mask,
        )

    t_open = time.perf_counter()
    model = ModelDir.open(cfg.model or default_model_dir())  # checks every file's sha256
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
                                     None, cfg.steps, cfg.height, cfg.width, cfg.scheduler,
                                     image, mask, cfg.strength, cfg.mask_blur))
        for p in prompts
    ]  # fmt: skip
    pipe.check_memory(pipe.plan_call([requests[0].part(0, min(cfg.batch_size, pipe.chunk_size))]))
    paths = plan_outputs(cfg.out, len(prompts) * cfg.batch_size)
    open_s = time.perf_counter() - t_open  # opening + integrity check + tokenizer + checks
    for text in dict.fromkeys(r.notice for r in requests if r.notice):
        click.echo(text, err=True)

    # one call per chunk: memory stays bounded and each image is on disk once its batch is
    # done (image i of a batch is seed + i generated alone, so the split changes nothing)
    for request in requests:
        for start in range(0, request.batch_size, pipe.chunk_size):
            n = min(pipe.chunk_size, request.batch_size - start)
            result = pipe.generate([request.part(start, n)])[0]
            timings = {"open_s": round(open_s, 6)} | result.timings.as_dict()
            open_s = 0.0  # once, with the first call
            for image, seed in zip(result.images, result.seeds):
                params = dict(result.params, seed=seed)
                path = save_image(next(paths), image, params)
                if as_json:  # timings: of the call (UNet batch) that made the image
                    line = {"path": str(path), **params, "timings": timings}
                    click.echo(json.dumps(line, ensure_ascii=False))
                else:
                    click.echo(f"wrote {path}")


def _edit_inputs(image_path, mask_path, cfg):
    """(image, mask) arrays of ``--image``/``--mask`` (None, None without), resized to
    --height/--width where those are given."""
    if mask_path and not image_path:
        raise InputError("--mask needs --image", fix="pass the image the mask belongs to.")
    if not image_path:
        return None, None
    from iap_rt.image_input import load_image, load_mask, resize

    image = load_image(image_path)
    mask = load_mask(mask_path) if mask_path else None
    if mask is not None and mask.shape != image.shape[:2]:
        raise InputError(
            f"the mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{image.shape[1]}x{image.shape[0]}",
            fix="use a mask of the image's size.",
        )
    if cfg.height is not None or cfg.width is not None:
        h, w = cfg.height or image.shape[0], cfg.width or image.shape[1]
        if (h, w) != image.shape[:2] and min(h, w) > 0:
            image = resize(image, w, h)
            mask = None if mask is None else resize(mask, w, h)
    return image, mask


@click.command("info")
@click.option("--model", type=click.Path(), help="Model directory (default: the embedded model).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON (for scripts).")
def info(model, as_json):
    """Summarise the install (ONNX Runtime, TensorRT) and a model directory: architecture,
    size, networks and their integrity, engines, sampling defaults, what it knows."""
    from iap_rt.modeldir import default_model_dir
    from iap_rt.summary import report, summary_lines

    doc = report(Path(model or default_model_dir()))
    if as_json:
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        for line in summary_lines(doc):
            click.echo(line)


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
