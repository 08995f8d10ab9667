"""``iap-rt bench``: the click command and the command line that reproduces a run (the run
itself is :func:`iap_rt.bench.run.run_bench`)."""

from __future__ import annotations

import json
import shlex
from dataclasses import fields

import click

from iap_rt.bench.config import ARCHES, BenchConfig
from iap_rt.bench.report import check_document, format_table
from iap_rt.bench.run import run_bench
from iap_rt.errors import IapRtError


@click.command("bench")
@click.option(
    "--arch",
    type=click.Choice(ARCHES),
    default="tiny",
    show_default=True,
    help="tiny / sd15: built from configs (random seeded weights) and exported into the "
    "cache once; toy: a trained toy model (--model).",
)
@click.option("--height", type=int, help="Image height [tiny 64, sd15 512, else the model's].")
@click.option("--width", type=int, help="Image width [as --height].")
@click.option("--steps", type=int, default=25, show_default=True, help="Denoising steps.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option(
    "--backends",
    default="torch,ort,ort-graph,trt",
    show_default=True,
    help="Comma-separated: torch (PyTorch reference), torch-compile, ort, ort-graph (ORT on "
    "CUDA with every network captured in a CUDA graph), trt.",
)
@click.option("--repeat", type=int, default=3, show_default=True, help="Measured runs.")
@click.option(
    "--warmup",
    type=int,
    default=1,
    show_default=True,
    help="Unmeasured runs per backend, the cold-start image included.",
)
@click.option(
    "--guidance", type=float, default=7.5, show_default=True, help="<= 1 turns guidance off."
)
@click.option("--scheduler", help="ddim, euler or dpm++ [the model's default].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, help="Intra-op threads for torch and ORT [all cores].")
@click.option(
    "--device",
    type=click.Choice(("auto", "cpu", "cuda")),
    default="auto",
    show_default=True,
    help="Where torch and ORT run (auto: CUDA when available).",
)
@click.option("--fp16", is_flag=True, help="Benchmark an fp16 ONNX export (for GPUs).")
@click.option(
    "--fp16-vae",
    is_flag=True,
    help="With --fp16: the VAE decoder in fp16 too. torch always runs the VAE at the model "
    "directory's VAE precision (like for like).",
)
@click.option(
    "--timeout",
    help="Seconds each backend's worker may take before it is killed: 600, or per backend "
    "torch=900,ort=300 (a bare number is the default for the rest). The JSON (--out) is "
    "written after every backend.",
)
@click.option(
    "--ort-unet",
    type=click.Choice(("fused", "exported")),
    default="fused",
    show_default=True,
    help="ort/ort-graph UNet graph: fused (unet.ort.onnx, ONNX Runtime's MultiHeadAttention, "
    "where the export wrote one) or exported (unet.onnx as exported, for A/B runs).",
)
@click.option("--model", type=click.Path(), help="An existing model directory (skips the cache).")
@click.option("--base", type=click.Path(), help="With --model: its diffusers base (for torch).")
@click.option("--encoder", type=click.Path(), help="With --model: its chinese_encoder/ (torch).")
@click.option("--cache-dir", type=click.Path(), help="Built models [~/.cache/iap-rt/bench].")
@click.option("--out", type=click.Path(), help="Write the result JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON to stdout.")
def bench(backends, out, as_json, **options):
    """Benchmark backends side by side on the same model, prompt, seed and noise.

    Every backend runs in its own subprocess (so peak RSS is its own): load + first image
    (cold start), warm-up, then --repeat measured images. Prints a table with speed-ups over
    torch and writes a JSON result (machine, config, results) with --out.
    """
    cfg = BenchConfig(
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()), **options
    )
    command = _command_line(cfg, out)

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    doc = run_bench(cfg, command=command, log=log, out=out)
    if as_json:
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        click.echo(format_table(doc))
        if out:
            click.echo(f"wrote {out}")
    errors = [s for s in doc["skipped"] if s.get("error")]
    problems = check_document(doc)
    if errors or problems or not doc["results"]:
        why = "; ".join(
            [f"{s['backend']}: {s['reason']}" for s in errors] + problems
            or ["no backend could run"]
        )
        raise IapRtError(
            f"benchmark incomplete: {why}",
            fix="see each backend's reason above; pass --backends naming only the backends this "
            "machine can run (unavailable ones are listed, not errors).",
        )


def _command_line(cfg, out) -> str:
    """The command that reproduces ``cfg`` (options that differ from their defaults)."""
    default = BenchConfig()
    words = ["iap-rt", "bench"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag)
        elif isinstance(value, tuple):
            words += [flag, ",".join(value)]
        else:
            words += [flag, str(value)]
    if out:
        words += ["--out", str(out)]
    return " ".join(shlex.quote(w) for w in words)
