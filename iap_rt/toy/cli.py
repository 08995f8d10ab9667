"""``iap-rt toy``: the toy world's data, English base model, attribute checker and evaluation.

No torch at import time: ``data`` needs numpy + PIL only; ``base``, ``checker`` and the
diffusers path of ``eval`` import torch inside their bodies.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from iap_rt.errors import ArtifactNotFoundError


@click.group("toy")
def toy():
    """The toy world: seeded data, an English base model trained from scratch, evaluation."""


@toy.command("data")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--n", "n", default=20000, show_default=True, help="Training images.")
@click.option("--n-test", default=None, type=int, help="Held-out-combination images [n/10].")
@click.option("--seed", default=0, show_default=True, help="Seed of images and captions.")
@click.option(
    "--split-seed", default=0, show_default=True, help="Seed of the held-out combinations."
)
def data_cmd(out, n, n_test, seed, split_seed):
    """Write images + train/test JSONL (+ 1%/3%/10% subsets) that `iap-rt train` reads."""
    from iap_rt.toy.data import write_dataset

    meta = write_dataset(out, n=n, seed=seed, split_seed=split_seed, n_test=n_test)
    click.echo(
        f"wrote {meta['n_train']} training + {meta['n_test']} held-out-combination images to "
        f"{out} ({len(meta['heldout'])} of 120 combinations held out; subsets: "
        + ", ".join(f"{k} ({v})" for k, v in meta["subsets"].items())
        + ")"
    )


@toy.command("base")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option(
    "--minutes", default=55.0, show_default=True, help="Training budget (CPU minutes, 1 thread)."
)
@click.option("--max-steps", default=None, type=int, help="Stop after this many steps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=None, type=int)
@click.option("--threads", default=1, show_default=True, help="torch threads.")
@click.option("--fresh", is_flag=True, help="Ignore an existing checkpoint in OUT.")
def base_cmd(data_dir, out, minutes, max_steps, seed, batch_size, threads, fresh):
    """Train the English base model (diffusers format) from scratch; resumes from OUT."""
    import dataclasses

    from iap_rt.toy.base import BaseConfig, train_base

    cfg = BaseConfig(seed=seed, threads=threads)
    if batch_size:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    train_base(
        data_dir,
        out,
        minutes=minutes,
        max_steps=max_steps,
        cfg=cfg,
        resume=not fresh,
        progress=lambda m: click.echo(m, err=True),
    )


@toy.command("checker")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True)
def checker_cmd(out, seed):
    """Train the attribute checker (small CNN) and print its accuracy on fresh images."""
    from iap_rt.toy.checker import train_checker

    res = train_checker(out, seed=seed, progress=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(res))


@toy.command("eval")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--lang", default="en", type=click.Choice(["en", "zh"]), show_default=True)
@click.option("--combos", default="heldout", type=click.Choice(["heldout", "train", "all"]))
@click.option("--seeds", default=4, show_default=True, help="Images per combination.")
@click.option("--steps", default=25, show_default=True)
@click.option("--guidance", default=3.0, show_default=True)
@click.option("--checker", "checker_path", default=None, type=click.Path(dir_okay=False))
@click.option("--grid", default=None, type=click.Path(dir_okay=False), help="Save a PNG grid.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model, lang, combos, seeds, steps, guidance, checker_path, grid, as_json):
    """Generate for every held-out combination and report colour/shape/position accuracy."""
    from iap_rt.toy.checker import Checker
    from iap_rt.toy.evaluate import evaluate, select_combos

    model = Path(model)
    if (model / "unet").is_dir() and (model / "text_encoder").is_dir():
        if lang != "en":
            raise click.UsageError(
                "a diffusers base directory has only the English text encoder: use --lang en"
            )
        from iap_rt.toy.evaluate import diffusers_generator

        generate = diffusers_generator(model, steps=steps, guidance=guidance)
    elif (model / "manifest.json").is_file():  # an exported iap-rt model directory
        from iap_rt.toy.evaluate import runtime_generator

        generate = runtime_generator(model, steps=steps, guidance=guidance)
    else:
        raise ArtifactNotFoundError(
            f"{model} is neither a diffusers base directory (unet/, text_encoder/, ...) nor an "
            "exported model directory (manifest.json)",
            fix="pass the directory `iap-rt toy base` or `iap-rt export` wrote.",
        )
    res, images, items = evaluate(
        generate,
        lang=lang,
        combos=select_combos(combos),
        seeds_per_combo=seeds,
        checker=Checker(checker_path),
    )
    res |= {"model": str(model), "combos": combos, "steps": steps, "guidance": guidance}
    if grid:
        from PIL import Image

        from iap_rt.toy.evaluate import grid as make_grid

        Image.fromarray(make_grid(images, cols=seeds * 4)).save(grid)
    if as_json:
        click.echo(json.dumps(res, ensure_ascii=False))
    else:
        click.echo(
            f"{lang} prompts, {combos} combinations, n={res['n']}: colour {res['colour']:.3f} "
            f"shape {res['shape']:.3f} position {res['position']:.3f} all {res['all']:.3f}"
        )
