"""``iap-rt train``: the click command (loaded lazily by ``iap_rt.cli``).

Every :class:`~iap_rt.train.config.TrainConfig` field is an option, generated from the field
(name, type, help, default) by :func:`iap_rt.config.config_options`, so the command line, ``iap-rt.toml`` and the recorded config can
never drift apart. Options left out keep the TOML value or the default (shown by ``--help``).
``--num-processes N`` (and ``--num-machines``...) hand the same command to N processes through
:mod:`~iap_rt.train.launch`.
"""

from __future__ import annotations

import dataclasses
import json
import shlex

import click

from iap_rt.config import config_options
from iap_rt.train.config import OBJECTIVES, PRECISIONS, SCHEDULES, TrainConfig

CHOICES = {"objective": OBJECTIVES, "lr_schedule": SCHEDULES, "mixed_precision": PRECISIONS}
REQUIRED = ("base", "encoder", "data", "out")
LAUNCH = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@click.command("train")
@config_options(TrainConfig, required=REQUIRED, choices=CHOICES)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--cache-only", is_flag=True, help="Build the latent/embedding cache and exit.")
@click.option("--config", "config_path", help="TOML file with a [train] table.")
@click.option(
    "--num-processes",
    type=int,
    default=1,
    show_default=True,
    help="Training processes on this machine (one per GPU); >1 starts and watches them.",
)
@click.option("--num-machines", type=int, default=1, show_default=True, help="Machines in the job.")
@click.option(
    "--machine-rank", type=int, default=0, show_default=True, help="This machine (0 = main)."
)
@click.option("--main-process-ip", help="Address of machine rank 0 (several machines).")
@click.option(
    "--main-process-port", type=int, help="Its port; default: a free one, 29500 across machines."
)
@click.pass_context
def train(ctx, resume: bool, cache_only: bool, config_path: str | None, **options) -> None:
    """IAP-train a Chinese text encoder against a frozen English Stable Diffusion.

    \b
    iap-rt train --base sd15/ --encoder bert-base-chinese/ --data pairs.jsonl --out run/
    iap-rt train ...same options... --resume             # continue after a stop or a kill
    iap-rt train ...same options... --num-processes 8    # 8 GPUs (or CPU processes)
    """
    from iap_rt.config import load_config
    from iap_rt.extras import require

    require("train", "train")  # before anything imports torch

    launch = {k: options.pop(k) for k in LAUNCH}
    options = {k: (v or None) if isinstance(v, tuple) else v for k, v in options.items()}
    args = _config_args(options, config_path, resume, cache_only)
    command = shlex.join(["iap-rt", "train", *args, *_launch_args(launch)])
    cfg = load_config(TrainConfig, "train", config_path, options)
    if launch["num_processes"] > 1 or launch["num_machines"] > 1:
        from iap_rt.train.launch import launch as start

        cfg.check()  # fail once here rather than in every process
        top = ["--debug"] if (ctx.parent and ctx.parent.params.get("debug")) else []
        top += ["--verbose"] if (ctx.parent and ctx.parent.params.get("verbose")) else []
        code = start(
            [*top, "train", *args],
            launch["num_processes"],
            launch["num_machines"],
            launch["machine_rank"],
            launch["main_process_ip"],
            launch["main_process_port"],
            command,
        )
        if code:
            raise SystemExit(code)
        return
    _run(cfg, resume, cache_only, command)


def _run(cfg: TrainConfig, resume: bool, cache_only: bool, command: str) -> None:
    from iap_rt.train.trainer import run

    summary = run(cfg, resume=resume, cache_only=cache_only, command=command)
    if not summary.get("main", True):
        return
    data = summary.get("data", {})
    if cache_only:
        click.echo(
            f"cache ready in {data.get('cache_dir')}: {data.get('usable')} usable rows, "
            f"{data.get('bad')} skipped, {data.get('images_hashed')} images hashed, "
            f"{data.get('latents_encoded')} images and "
            f"{data.get('english_encoded')} captions encoded"
        )
        return
    click.echo(
        json.dumps(
            {k: v for k, v in summary.items() if k not in ("data", "main")}, ensure_ascii=False
        )
    )
    if data.get("bad"):
        click.echo(f"skipped {data['bad']} of {data['rows']} rows (missing or corrupt images)")
    click.echo(f"wrote {cfg.out}/chinese_encoder (export it with `iap-rt export`)")


def _config_args(options: dict, config_path, resume: bool, cache_only: bool) -> list[str]:
    """The command-line arguments that reproduce these options (for workers and the resume
    hint)."""
    out: list[str] = []
    for fld in dataclasses.fields(TrainConfig):
        v = options.get(fld.name)
        if v is None:
            continue
        if isinstance(v, bool):
            out.append(_flag(fld.name) if v else "--no-" + _flag(fld.name)[2:])
        elif isinstance(v, tuple):
            for item in v:
                out += [_flag(fld.name), str(item)]
        else:
            out += [_flag(fld.name), str(v)]
    if config_path:
        out += ["--config", str(config_path)]
    out += ["--resume"] if resume else []
    out += ["--cache-only"] if cache_only else []
    return out


def _launch_args(launch: dict) -> list[str]:
    defaults = {"num_processes": 1, "num_machines": 1, "machine_rank": 0}
    out = []
    for k, v in launch.items():
        if v is not None and v != defaults.get(k):
            out += [_flag(k), str(v)]
    return out
