"""``iap-rt toy``: the toy world's command group (one- and two-object scenes): data, checker,
English base, evaluation, the transfer grid, the claim, learning curves and the plug-in run.

No torch at import time: ``data`` needs numpy + PIL only; the other commands import torch (or
the runtime) inside their bodies.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from iap_rt.errors import ArtifactNotFoundError
from iap_rt.extras import require


@click.group("toy")
def toy():
    """The toy world: one or two coloured shapes, IAP from data to the embedded model."""


@toy.command("data")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--n", "n", default=40000, show_default=True, help="Training images.")
@click.option("--n-test", default=None, type=int, help="Held-out-combo images [n/10].")
@click.option("--seed", default=0, show_default=True, help="Seed of images and captions.")
@click.option("--split-seed", default=0, show_default=True, help="Seed of the held-out combos.")
@click.option("--style", default="flat", type=click.Choice(["flat", "outline"]), show_default=True)
def data_cmd(out, n, n_test, seed, split_seed, style):
    """Write images + train/test JSONL (+ 1/5/10/100 % subsets) that `iap-rt train` reads."""
    from iap_rt.train.toy.data import write_dataset

    meta = write_dataset(out, n=n, seed=seed, split_seed=split_seed, n_test=n_test, style=style)
    click.echo(
        f"wrote {meta['n_train']} training + {meta['n_test']} held-out-combo images to {out} "
        f"({len(meta['heldout'])} held-out combos; subsets: "
        + ", ".join(f"{k} ({v})" for k, v in meta["subsets"].items())
        + ")"
    )


@toy.command("unpack")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to fill.")
@click.option(
    "--n", "n", default=40000, show_default=True, help="Training images to generate (0 = none)."
)
def unpack_cmd(out, n):
    """Write the shipped English base (OUT/base), the dataset (OUT/data) and a config for a
    fresh Chinese encoder (OUT/encoder_config.json).

    OUT/base is the base the embedded default model was exported from, so `iap-rt train --base
    OUT/base --encoder OUT/encoder_config.json --data OUT/data/train_10pct.jsonl --resolution
    32 ...` and `iap-rt export` run without an SD checkpoint of your own. The dataset is
    regenerated from its seed (`iap-rt toy data`'s defaults)."""
    import os
    import shutil

    require("train", "toy unpack")

    from iap_rt.fileio import staging_dir, write_json_atomic
    from iap_rt.tokenizer import bert_chinese_vocab_path, build_wordpiece_tokenizer
    from iap_rt.train.toy.base_model import shipped_base_dir
    from iap_rt.train.toy.data import write_dataset
    from iap_rt.train.toy.transfer import ZH_MAX_LENGTH, encoder_config

    src, dst = shipped_base_dir(), Path(out) / "base"
    if dst.exists():
        raise click.UsageError(f"{dst} exists; pass an empty or new --out")
    with staging_dir(dst) as stage:  # whole or not at all
        shutil.copytree(src, stage, dirs_exist_ok=True)
        os.rename(stage, dst)
    click.echo(f"wrote the toy base to {dst}")
    width = json.loads((dst / "unet" / "config.json").read_text("utf-8"))["cross_attention_dim"]
    vocab = build_wordpiece_tokenizer(bert_chinese_vocab_path()).get_vocab_size()
    cfg = encoder_config(vocab, width, max_positions=ZH_MAX_LENGTH)
    write_json_atomic(Path(out) / "encoder_config.json", cfg)
    click.echo(f"wrote {Path(out) / 'encoder_config.json'} (BERT, {width} wide, {vocab} tokens)")
    if n:
        meta = write_dataset(Path(out) / "data", n=n)
        click.echo(f"wrote {meta['n_train']} training images to {Path(out) / 'data'}")


@toy.command("checker")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch threads.")
def checker_cmd(out, seed, threads):
    """Train the checker (small CNN) and print its accuracy on fresh synthetic images."""
    require("train", "toy checker")
    from iap_rt.train.toy.checker import train_checker

    res = train_checker(out, seed=seed, threads=threads, progress=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(res))


@toy.command("base")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option(
    "--minutes",
    default=90.0,
    show_default=True,
    help="Budget: the process's CPU time / threads, counted across resumes. The learning rate "
    "cools to 0 over its last 30 %, so resume with the same budget. The shipped base "
    "(iap_rt/data/toy_base) is 90 at 1 thread; at 2 threads 72 is about 90 wall-clock minutes "
    "on an idle 2-core machine (a fifth of a step runs on one thread).",
)
@click.option("--max-steps", default=None, type=int, help="Stop after this many steps.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    help="torch threads (on a shared machine use 1: extra threads cost CPU time in waiting).",
)
@click.option(
    "--attention-levels",
    default=None,
    type=click.IntRange(1, 5),
    help="UNet levels with cross-attention, counted from the 2x2 bottleneck up: 3 = 8x8 and "
    "below (the default), 4 = also 16x16.",
)
@click.option(
    "--text-aux",
    default=0.1,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Weight of an auxiliary loss that makes the text encoder's EOS state name the scene "
    "(layout, and colour and shape of the left/top and the right/bottom object): a stand-in "
    "for the image-text pretraining SD's CLIP had. The shipped base used 0.1; without it "
    "(0 = off) the base never learns which object goes first (relation 0.46 instead of 1.00).",
)
@click.option("--fresh", is_flag=True, help="Ignore an existing checkpoint in OUT.")
def base_cmd(data_dir, out, minutes, max_steps, seed, threads, attention_levels, text_aux, fresh):
    """Train the English base (diffusers format) from scratch; resumes from OUT."""
    require("train", "toy base")
    import os

    # The budget is CPU time / threads. OpenMP threads that spin while waiting burn CPU time
    # without work on a shared machine (13 cpu-s/step instead of ~0.7 at load 9): let them
    # sleep. Must be set before torch loads libgomp.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from iap_rt.train.toy.base import train_base
    from iap_rt.train.toy.base_model import BaseConfig, attention_blocks

    levels = {} if attention_levels is None else attention_blocks(attention_levels)
    aux = {"extra": {"text_aux_weight": text_aux}} if text_aux > 0 else {}
    train_base(
        data_dir,
        out,
        minutes=minutes,
        max_steps=max_steps,
        cfg=BaseConfig(seed=seed, threads=threads, **levels, **aux),
        resume=not fresh,
        progress=lambda m: click.echo(m, err=True),
    )


@toy.command("base-eval")
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the JSON here.")
@click.option("--seeds-two", default=2, show_default=True, help="Images per two-object combo.")
@click.option("--seeds-one", default=4, show_default=True, help="Images per one-object combo.")
@click.option("--threads", default=1, show_default=True)
def base_eval_cmd(base, out, seeds_two, seeds_one, threads):
    """Score an English base on every held-out combo (the record bench/results/toy2_base.json)."""
    require("train", "toy base-eval")
    from iap_rt.train.toy.evaluate import evaluate_base

    rec = evaluate_base(base, out, seeds_two=seeds_two, seeds_one=seeds_one, threads=threads)
    click.echo(json.dumps({k: rec[k] for k in ("two_object", "one_object", "train")}))


@toy.command("eval")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--lang", default="en", type=click.Choice(["en", "zh"]), show_default=True)
@click.option("--combos", default="heldout", type=click.Choice(["heldout", "train", "all"]))
@click.option("--kind", default="all", type=click.Choice(["all", "one", "two"]))
@click.option(
    "--max-combos", default=None, type=click.IntRange(min=1), help="Per kind, evenly spread."
)
@click.option("--seeds", default=2, show_default=True, help="Images per combo.")
@click.option("--steps", default=25, show_default=True)
@click.option("--guidance", default=3.0, show_default=True)
@click.option("--checker", "checker_path", default=None, type=click.Path(dir_okay=False))
@click.option("--grid", default=None, type=click.Path(dir_okay=False), help="Save a PNG grid.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(
    model, lang, combos, kind, max_combos, seeds, steps, guidance, checker_path, grid, as_json
):
    """Generate for held-out combos; report per-object colour/shape, relation and binding."""
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
    elif (model / "manifest.json").is_file():
        from iap_rt.train.toy.evaluate import runtime_generator

        generate = runtime_generator(model, steps=steps, guidance=guidance)
    else:
        raise ArtifactNotFoundError(
            f"{model} is neither a diffusers base directory (unet/, text_encoder/, ...) nor an "
            "exported model directory (manifest.json)",
            fix="pass the directory `iap-rt toy base` or `iap-rt export` wrote.",
        )
    res, images, _, _ = evaluate(
        generate,
        lang=lang,
        combos=select_combos(combos, kind, limit=max_combos),
        seeds_per_combo=seeds,
        checker=Checker(checker_path),
    )
    res |= {"model": str(model), "combos": combos, "kind": kind, "max_combos": max_combos}
    res |= {"seeds": seeds, "steps": steps, "guidance": guidance}
    if grid:
        from PIL import Image

        from iap_rt.train.toy.evaluate import grid as make_grid

        Image.fromarray(make_grid(images, cols=16)).save(grid)
    if as_json:
        click.echo(json.dumps(res, ensure_ascii=False))
    else:
        click.echo(
            ", ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float))
            + f" (n={res['n']})"
        )


@toy.command("transfer")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--work", required=True, type=click.Path(file_okay=False), help="Runs, models, cells."
)
@click.option("--results", default="bench/results", show_default=True, type=click.Path())
@click.option("--fractions", default="1pct,5pct,10pct", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option(
    "--budget-s",
    default=180.0,
    show_default=True,
    help="CPU seconds (one thread) per Chinese cell; denoise at 100 % gets 5x.",
)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--jobs", default=2, show_default=True, help="Cells in parallel (1 thread each).")
def transfer_cmd(data_dir, base, work, results, fractions, seeds, budget_s, batch_size, jobs):
    """The transfer grid (resumable): English, untrained, pivot/full/embed/denoise cells."""
    require("train", "toy transfer")
    _one_thread()
    from iap_rt.train.toy.transfer import run_grid

    rec = run_grid(
        data_dir,
        base,
        work,
        results=results,
        fractions=_names(fractions, "--fractions"),
        seeds=_ints(seeds, "--seeds"),
        budget_s=budget_s,
        batch=batch_size,
        jobs=jobs,
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(f"wrote {Path(results) / 'toy_transfer.md'} ({len(rec['results'])} rows)")


@toy.command("claim")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--work", required=True, type=click.Path(file_okay=False), help="Runs and cells.")
@click.option("--results", default="bench/results", show_default=True, type=click.Path())
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--long-seeds", default="0", show_default=True, help="Seeds of denoise at 5x.")
@click.option("--budget-s", default=900.0, show_default=True, help="CPU seconds per run.")
@click.option("--jobs", default=2, show_default=True, help="Runs in parallel (1 thread each).")
def claim_cmd(data_dir, base, work, results, seeds, long_seeds, budget_s, jobs):
    """The paper's claim at equal compute: pivot on 10 % vs denoise on 100 % (resumable)."""
    require("train", "toy claim")
    _one_thread()
    from iap_rt.train.toy.claim import run_claim

    run_claim(data_dir, base, work, results=results,
              seeds=_ints(seeds, "--seeds"),
              long_seeds=_ints(long_seeds, "--long-seeds"),
              budget_s=budget_s, jobs=jobs, log=lambda m: click.echo(m, err=True))  # fmt: skip
    click.echo(f"wrote {Path(results) / 'toy_claim.json'}")


@toy.command("curves")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False))
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--work", required=True, type=click.Path(file_okay=False), help="The grid's WORK.")
@click.option("--results", default="bench/results", show_default=True, type=click.Path())
@click.option("--plot", "plot_path", default="docs/toy_curves.png", show_default=True)
@click.option("--budget-s", default=180.0, show_default=True, help="The grid's --budget-s.")
@click.option("--jobs", default=2, show_default=True)
def curves_cmd(data_dir, base, work, results, plot_path, budget_s, jobs):
    """Learning curves at 10 % (+ the grid's denoise at 100 %): binding vs CPU time / samples."""
    require("train", "toy curves")
    _one_thread()
    from iap_rt.train.toy.curves import run_curves

    run_curves(data_dir, base, work, results=results, plot_path=plot_path, budget_s=budget_s,
               jobs=jobs, log=lambda m: click.echo(m, err=True))  # fmt: skip
    click.echo(f"wrote {Path(results) / 'toy_curves.json'} and {plot_path}")


@toy.command("finetune")
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Restyled data: iap-rt toy data --style outline.")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option(
    "--minutes",
    default=20.0,
    show_default=True,
    help="CPU minutes (one thread); the learning rate cools to 0 over the last 30 %.",
)
def finetune_cmd(base, data_dir, out, minutes):
    """Fine-tune the base's UNet alone on restyled images with English captions.

    Resumable: OUT/checkpoint is written every 3 minutes; run the same command again to
    continue (the CPU budget counts across resumes)."""
    require("train", "toy finetune")
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from iap_rt.train.toy.finetune import finetune_unet

    torch.set_num_threads(1)
    finetune_unet(base, data_dir, out, minutes=minutes, progress=lambda m: click.echo(m, err=True))


@toy.command("plugin")
@click.option("--finetuned", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--work", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default="bench/results/toy_plugin.json", show_default=True)
@click.option("--fraction", default="10pct", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="The grid seeds to take.")
@click.option("--source", type=click.Choice(["grid", "curves"]), default="grid",
              show_default=True,
              help="Which encoders: the grid's cells, or the learning curves' long runs "
                   "(seed 0 only; 5x the grid's budget).")  # fmt: skip
def plugin_cmd(finetuned, work, out, fraction, seeds, source):
    """The grid's Chinese encoders with the fine-tuned UNet, no retraining."""
    require("train", "toy plugin")
    _one_thread()
    from iap_rt.train.toy.finetune import plugin_eval

    seed_list = _ints(seeds, "--seeds")
    plugin_eval(finetuned, work, out, fraction=fraction, seeds=seed_list, source=source,
                log=lambda m: click.echo(m, err=True))  # fmt: skip
    click.echo(f"wrote {out}")


def _one_thread() -> None:
    """Every torch / ONNX Runtime user in this process and its workers: one thread (set before
    torch loads its thread pool). CPU time then measures work on a shared machine."""
    import os

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "IAP_RT_THREADS"):
        os.environ.setdefault(var, "1")


def _names(text: str, option: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    if not names:
        raise click.BadParameter("give at least one value", param_hint=option)
    return names


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _names(text, option))
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=option
        ) from None
