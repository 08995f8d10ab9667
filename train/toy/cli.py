"""``iap-rt toy``: the toy world's data, English base model, attribute checker and evaluation.

No torch at import time: ``data`` needs numpy + PIL only; ``base``, ``checker`` and the
diffusers path of ``eval`` import torch inside their bodies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from iap_rt.errors import ArtifactNotFoundError
from iap_rt.extras import require
from iap_rt.modeldir import MANIFEST


@click.group("toy")
def toy():
    """The toy world: data, English base, checker, transfer table, evaluation, shipped base."""


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
    from iap_rt.train.toy.data import write_dataset

    meta = write_dataset(out, n=n, seed=seed, split_seed=split_seed, n_test=n_test)
    click.echo(
        f"wrote {meta['n_train']} training + {meta['n_test']} held-out-combination images to "
        f"{out} ({len(meta['heldout'])} of 120 combinations held out; subsets: "
        + ", ".join(f"{k} ({v})" for k, v in meta["subsets"].items())
        + ")"
    )


@toy.command("unpack")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to fill.")
@click.option(
    "--n", "n", default=20000, show_default=True, help="Training images to generate (0 = none)."
)
def unpack_cmd(out, n):
    """Write the shipped toy English base (OUT/base), the toy dataset (OUT/data) and a config
    for a fresh Chinese encoder (OUT/encoder_config.json).

    OUT/base is the diffusers-format base the embedded default model was made from, so
    `iap-rt train --base OUT/base --encoder OUT/encoder_config.json --data
    OUT/data/train_10pct.jsonl --resolution 32 ...` and `iap-rt export` run without an SD
    checkpoint of your own. The dataset is regenerated from its seed."""
    import shutil

    require("train", "toy unpack")

    from iap_rt.fileio import staging_dir, write_json_atomic
    from iap_rt.tokenizer import bert_chinese_vocab_path, build_wordpiece_tokenizer
    from iap_rt.train.toy.base import shipped_base_dir
    from iap_rt.train.toy.data import write_dataset
    from iap_rt.train.toy.transfer import encoder_config

    src, dst = shipped_base_dir(), Path(out) / "base"
    if dst.exists():
        raise click.UsageError(f"{dst} exists; pass an empty or new --out")
    with staging_dir(dst) as stage:  # whole or not at all
        shutil.copytree(src, stage, dirs_exist_ok=True)
        os.rename(stage, dst)
    click.echo(f"wrote the toy base to {dst}")
    width = json.loads((dst / "unet" / "config.json").read_text("utf-8"))["cross_attention_dim"]
    vocab = build_wordpiece_tokenizer(bert_chinese_vocab_path()).get_vocab_size()
    write_json_atomic(Path(out) / "encoder_config.json", encoder_config(vocab, width))
    click.echo(f"wrote {Path(out) / 'encoder_config.json'} (BERT, {width} wide, {vocab} tokens)")
    if n:
        meta = write_dataset(Path(out) / "data", n=n)
        click.echo(f"wrote {meta['n_train']} training images to {Path(out) / 'data'}")


@toy.command("base")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option(
    "--minutes",
    default=55.0,
    show_default=True,
    help="Training budget: the process's CPU time / threads (= wall minutes on an idle machine).",
)
@click.option("--max-steps", default=None, type=int, help="Stop after this many steps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=None, type=int)
@click.option("--threads", default=2, show_default=True, help="torch threads.")
@click.option("--fresh", is_flag=True, help="Ignore an existing checkpoint in OUT.")
def base_cmd(data_dir, out, minutes, max_steps, seed, batch_size, threads, fresh):
    """Train the English base model (diffusers format) from scratch; resumes from OUT."""
    import dataclasses

    require("train", "toy base")

    from iap_rt.train.toy.base import BaseConfig, train_base

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
    require("train", "toy checker")
    from iap_rt.train.toy.checker import train_checker

    res = train_checker(out, seed=seed, progress=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(res))


@toy.command("eval")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--lang", default="en", type=click.Choice(["en", "zh"]), show_default=True)
@click.option("--combos", default="heldout", type=click.Choice(["heldout", "train", "all"]))
@click.option(
    "--max-combos",
    default=None,
    type=click.IntRange(min=1),
    help="Evaluate only this many combinations, evenly spread over the list [all].",
)
@click.option("--seeds", default=4, show_default=True, help="Images per combination.")
@click.option("--steps", default=25, show_default=True)
@click.option("--guidance", default=3.0, show_default=True)
@click.option("--checker", "checker_path", default=None, type=click.Path(dir_okay=False))
@click.option("--grid", default=None, type=click.Path(dir_okay=False), help="Save a PNG grid.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model, lang, combos, max_combos, seeds, steps, guidance, checker_path, grid, as_json):
    """Generate for every held-out combination and report colour/shape/position accuracy."""
    from iap_rt.train.toy.checker import Checker
    from iap_rt.train.toy.evaluate import evaluate, select_combos

    model = Path(model)
    if (model / "unet").is_dir() and (model / "text_encoder").is_dir():
        if lang != "en":
            raise click.UsageError(
                "a diffusers base directory has only the English text encoder: use --lang en"
            )
        require("train", "toy eval (of a diffusers base)")
        from iap_rt.train.toy.evaluate import diffusers_generator

        generate = diffusers_generator(model, steps=steps, guidance=guidance)
    elif (model / MANIFEST).is_file():  # an exported iap-rt model directory
        from iap_rt.train.toy.evaluate import runtime_generator

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
        combos=select_combos(combos, limit=max_combos),
        seeds_per_combo=seeds,
        checker=Checker(checker_path),
    )
    res |= {"model": str(model), "combos": combos, "max_combos": max_combos}
    res |= {"seeds": seeds, "steps": steps, "guidance": guidance}
    if grid:
        from PIL import Image

        from iap_rt.train.toy.evaluate import grid as make_grid

        Image.fromarray(make_grid(images, cols=seeds * 4)).save(grid)
    if as_json:
        click.echo(json.dumps(res, ensure_ascii=False))
    else:
        click.echo(
            f"{lang} prompts, {combos} combinations, n={res['n']}: colour {res['colour']:.3f} "
            f"shape {res['shape']:.3f} position {res['position']:.3f} all {res['all']:.3f}"
        )


@toy.command("transfer")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Toy dataset (iap-rt toy data): train_<fraction>.jsonl are the training sets.",
)
@click.option(
    "--base",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="English toy base (iap-rt toy base / unpack).",
)
@click.option(
    "--work", required=True, type=click.Path(file_okay=False), help="Runs, models, cell results."
)
@click.option(
    "--results",
    default="bench/results",
    show_default=True,
    type=click.Path(),
    help="Where toy_transfer.json/.md go.",
)
@click.option("--fractions", default="1pct,3pct,10pct", show_default=True, help="Data subsets.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Encoder/training seeds.")
@click.option(
    "--budget-s",
    default=90.0,
    show_default=True,
    help="Training seconds per Chinese row (steps per objective from a calibration run).",
)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--jobs", default=2, show_default=True, help="Cells run in parallel (1 thread each).")
@click.option("--eval-seeds", default=3, show_default=True, help="Images per held-out combination.")
@click.option("--steps", default=25, show_default=True, help="DDIM steps of evaluation images.")
@click.option("--guidance", default=3.0, show_default=True, help="Guidance of evaluation images.")
def transfer_cmd(
    data_dir,
    base,
    work,
    results,
    fractions,
    seeds,
    budget_s,
    batch_size,
    jobs,
    eval_seeds,
    steps,
    guidance,
):
    """Produce the transfer table: English base vs untrained/embed/denoise/full/pivot encoders.

    Every Chinese row trains a fresh encoder for the same time on the same data fraction, for
    every seed; finished cells are kept in WORK, so an interrupted run resumes."""
    require("train", "toy transfer")
    from iap_rt.train.toy.transfer import default_eval, run_grid

    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds"
        ) from None
    if not seed_list:
        raise click.BadParameter("give at least one seed", param_hint="--seeds")
    ev = default_eval() | {"seeds_per_combo": eval_seeds, "steps": steps, "guidance": guidance}
    rec = run_grid(
        data_dir,
        base,
        work,
        results=results,
        fractions=tuple(f.strip() for f in fractions.split(",") if f.strip()),
        seeds=seed_list,
        budget_s=budget_s,
        batch=batch_size,
        jobs=jobs,
        ev=ev,
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(f"wrote {Path(results) / 'toy_transfer.md'} ({len(rec['tables'])} fractions)")
