"""``iap-rt engines build|check``: TensorRT engines for a model directory."""

from __future__ import annotations

import click

from iap_rt.config import config_options, load_config
from iap_rt.enginedir import FLAVOURS
from iap_rt.engines.config import EngineConfig
from iap_rt.errors import ArtifactMismatchError, ArtifactNotFoundError

FLAVOUR_CHOICE = click.Choice(["auto", *FLAVOURS])


@click.group("engines")
def engines():
    """Build and check TensorRT engines (tensorrt >= 10 or tensorrt_rtx) from a model's ONNX."""


@engines.command("build")
@click.option(
    "--model",
    "model",
    required=True,
    type=click.Path(file_okay=False),
    help="Model directory written by `iap-rt export`.",
)
@config_options(
    EngineConfig,
    choices={"flavour": ("auto", *FLAVOURS)},
    names={"flavour": "--trt-flavour", "dynamic": "--dynamic/--static",
           "compute_capabilities": ("--compute-capabilities", "--compute-capability")},
)  # fmt: skip
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Workspace TOML (default ./iap-rt.toml); its [engines] table.",
)
@click.option("--force", is_flag=True, help="Rebuild even when up-to-date engines exist.")
def build(model, config_path, force, **options):  # fmt: skip
    """Build engines into MODEL/engines/<gpu-tag>/ (up-to-date ones are reused)."""
    from iap_rt.engines.config import EngineConfig
    from iap_rt.engines.stage import build_engines

    cfg = load_config(EngineConfig, "engines", config_path, options)
    paths = build_engines(model, cfg, force=force, echo=click.echo)
    click.echo(f"{len(paths)} engine(s) ready under {model}/engines/")


@engines.command("check")
@click.option(
    "--model", "model", required=True, type=click.Path(file_okay=False), help="Model directory."
)
@click.option(
    "--trt-flavour",
    "flavour",
    type=FLAVOUR_CHOICE,
    default="auto",
    help="Check only engines of this flavour.",
)
def check(model, flavour):
    """Check every engine's sidecar and file without loading it into TensorRT."""
    from iap_rt.cuda import gpu_info
    from iap_rt.enginedir import installed_flavours
    from iap_rt.engines.stage import check_engines

    rows = check_engines(model, flavour)
    if not rows:
        raise ArtifactNotFoundError(
            f"no engines under {model}/engines/", fix=f"iap-rt engines build --model {model}"
        )
    bad = 0
    for r in rows:
        name = f"{r['dir']}/{r.get('engine') or r['sidecar']}"
        if r["problems"]:
            bad += 1
            click.echo(f"BAD  {name}")
            for p in r["problems"]:
                click.echo(f"     - {p}")
            if r.get("rebuild"):
                click.echo(f"     rebuild: {r['rebuild']}")
        else:
            click.echo(f"ok   {name}  ({r['flavour']} {r['trt_version']}, {r['precision']})")
    gpu = gpu_info()
    click.echo(
        f"this machine: TensorRT {', '.join(installed_flavours()) or 'not installed'}; "
        + (f"GPU {gpu.name} (compute capability {gpu.cc_str})" if gpu else
           "no GPU visible (GPU checks skipped)")
    )  # fmt: skip
    if bad:
        raise ArtifactMismatchError(
            f"{bad} of {len(rows)} engine(s) under {model}/engines/ cannot be used here",
            fix="rebuild with the command shown under each.",
        )
