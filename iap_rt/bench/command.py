"""``iap-rt bench``: the click command and the command line that reproduces a run (the run
itself is :func:`iap_rt.bench.run.run_bench`)."""

from __future__ import annotations

import json
import shlex
from dataclasses import fields

import click

from iap_rt.bench.config import ARCHES, DEVICES, ORT_UNET_GRAPHS, BenchConfig
from iap_rt.bench.report import check_document, format_table
from iap_rt.bench.run import run_bench
from iap_rt.config import config_options
from iap_rt.errors import IapRtError


@click.command("bench")
@config_options(
    BenchConfig,
    choices={"arch": ARCHES, "device": DEVICES, "ort_unet": ORT_UNET_GRAPHS},
    comma_lists=("backends",),
)
@click.option("--out", type=click.Path(), help="Write the result JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON to stdout.")
def bench(out, as_json, **options):
    """Benchmark backends side by side on the same model, prompt, seed and noise.

    Every backend runs in its own subprocess (so peak RSS is its own): load + first image
    (cold start), warm-up, then --repeat measured images. Prints a table with speed-ups over
    torch and writes a JSON result (machine, config, results) with --out.
    """
    cfg = BenchConfig(**{k: v for k, v in options.items() if v is not None})
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
