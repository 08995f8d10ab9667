"""``iap-rt engines build|check``: TensorRT engines for a model directory."""

from __future__ import annotations

import click

from iap_rt.config import load_config
from iap_rt.errors import ArtifactMismatchError, ArtifactNotFoundError

FLAVOUR_CHOICE = click.Choice(["auto", "tensorrt", "tensorrt_rtx"])


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
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Workspace TOML (default ./iap-rt.toml); its [engines] table.",
)
@click.option(
    "--trt-flavour",
    "flavour",
    type=FLAVOUR_CHOICE,
    default=None,
    help="TensorRT flavour (default auto: what is installed).",
)
@click.option(
    "--height",
    type=int,
    default=None,
    help="Image height to optimise for [the model's native size].",
)
@click.option(
    "--width", type=int, default=None, help="Image width to optimise for [the model's native size]."
)
@click.option("--batch", default=None, help="Images per prompt: 1 (static) or MIN:MAX, e.g. 1:4.")
@click.option("--resolution", default=None, help="Dynamic image side range MIN:MAX, e.g. 256:768.")
@click.option(
    "--dynamic/--static",
    default=None,
    help="Dynamic shorthand: --batch 1:4 --resolution 256:1024 unless given.",
)
@click.option(
    "--guidance/--no-guidance",
    default=None,
    help="Engines for classifier-free guidance (UNet/text batch 2B) [guidance].",
)
@click.option("--networks", default=None, help="Comma-separated subset, e.g. unet [all].")
@click.option(
    "--compute-capability",
    "compute_capabilities",
    default=None,
    help="TensorRT-RTX targets, e.g. 8.6,8.9 or current [portable default].",
)
@click.option("--optimization-level", type=int, default=None, help="Builder level 0-5 [3].")
@click.option("--workspace-mb", type=int, default=None, help="Builder workspace limit (MiB).")
@click.option(
    "--timing-cache/--no-timing-cache",
    default=None,
    help="Keep a per-GPU timing cache (full TensorRT) [on].",
)
@click.option(
    "--detailed-profile/--no-detailed-profile",
    default=None,
    help="Keep detailed layer info (engine inspector).",
)
@click.option(
    "--cuda-graph/--no-cuda-graph",
    default=None,
    help="Default the runtime to CUDA-graph capture of the UNet step.",
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
