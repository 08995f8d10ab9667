"""``iap-rt train``: the click command (loaded lazily by ``iap_rt.cli``)."""

from __future__ import annotations

import json

import click

from iap_rt.train.config import OBJECTIVES, PRECISIONS


@click.command("train")
@click.option("--base", help="Diffusers SD pipeline directory (unet/ vae/ text_encoder/ ...).")
@click.option("--encoder", help="HF BERT/RoBERTa dir, chinese_encoder/, or a config.json.")
@click.option("--data", help="JSONL/CSV with image,zh,en (paths relative to the file).")
@click.option("--out", help="Output directory.")
@click.option("--objective", type=click.Choice(OBJECTIVES), help="Training objective.")
@click.option("--layers", help="Cross-attention layers: all, or e.g. down,mid,up.")
@click.option("--max-steps", type=int, help="Optimizer steps.")
@click.option("--batch-size", type=int, help="Samples per process per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, help="Linear warm-up steps before the peak rate.")
@click.option("--resolution", type=int, help="Image side in pixels (multiple of 8).")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--mixed-precision", type=click.Choice(PRECISIONS), help="GPU mixed precision.")
@click.option("--val-data", help="Held-out JSONL/CSV for validation.")
@click.option("--cache-dir", help="Latent/embedding cache directory (default OUT/cache).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--cache-only", is_flag=True, help="Build the latent/embedding cache and exit.")
@click.option("--config", "config_path", help="TOML file with a [train] table.")
def train(resume: bool, cache_only: bool, config_path: str | None, **options) -> None:
    """IAP-train a Chinese text encoder against a frozen English Stable Diffusion.

    \b
    iap-rt train --base sd15/ --encoder bert-base-chinese/ --data pairs.jsonl --out run/
    iap-rt train ...same options... --resume  # continue after a kill
    """
    from iap_rt.config import resolve
    from iap_rt.extras import require

    require("train", "train")  # before anything imports torch
    from iap_rt.train.config import TrainConfig
    from iap_rt.train.trainer import run

    cfg = resolve(TrainConfig, "train", config_path, options)
    summary = run(cfg, resume=resume, cache_only=cache_only)
    data = summary.get("data", {})
    if cache_only:
        click.echo(
            f"cache ready in {data.get('cache_dir')}: {data.get('usable')} usable rows, "
            f"{data.get('bad')} skipped, {data.get('latents_encoded')} images and "
            f"{data.get('english_encoded')} captions encoded"
        )
        return
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "data"}, ensure_ascii=False))
    if data.get("bad"):
        click.echo(f"skipped {data['bad']} of {data['rows']} rows (missing or corrupt images)")
    click.echo(f"wrote {cfg.out}/chinese_encoder (export it with `iap-rt export`)")
