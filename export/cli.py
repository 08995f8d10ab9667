"""``iap-rt export``: SD directory + Chinese encoder -> validated ONNX model directory."""

from __future__ import annotations

import click

from iap_rt.export.config import ENGINE_MODES, ORT_UNET_MODES, SUPPORTED_OPSETS


def _networks(ctx, param, value):
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


@click.command("export")
@click.option("--base", type=click.Path(), help="Local diffusers-format SD directory.")
@click.option("--encoder", type=click.Path(), help="chinese_encoder/ written by `iap-rt train`.")
@click.option("--out", type=click.Path(), help="Model directory to write or update.")
@click.option(
    "--unet",
    type=click.Path(),
    help="Plug-in UNet: a fine-tuned UNet folder of the base's architecture, or a LoRA "
    ".safetensors (diffusers/PEFT) fused into the base's UNet. The Chinese encoder is reused.",
)
@click.option("--lora-scale", type=float, default=None, help="Strength of a --unet LoRA [1.0].")
@click.option("--fp16/--no-fp16", default=None, help="fp16 text encoder and UNet (VAE stays fp32).")
@click.option("--fp16-vae/--no-fp16-vae", default=None, help="fp16 VAE decoder too.")
@click.option(
    "--opset",
    type=int,
    default=None,
    help=f"ONNX opset, {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} (default 18).",
)
@click.option(
    "--networks",
    callback=_networks,
    metavar="LIST",
    help="Comma list of networks to (re-)export: text_encoder,unet,vae_decoder (default all).",
)
@click.option("--force", is_flag=True, default=None, help="Re-export even if unchanged.")
@click.option("--model-id", default=None, help="Model id for the manifest (default: out's name).")
@click.option(
    "--engines",
    type=click.Choice(ENGINE_MODES),
    default=None,
    help="TensorRT engines: auto (if TensorRT is installed), none, only (from existing ONNX).",
)
@click.option(
    "--ort-unet",
    "--ort-cpu-unet",  # its name before 0.2
    "ort_unet",
    type=click.Choice(ORT_UNET_MODES),
    default=None,
    help="Also write unet.ort.onnx, the UNet with ONNX Runtime's fused attention (the ort "
    "backend's choice on CPU and CUDA): auto (big UNets, whose weights are external), always, "
    "never.",
)
@click.option("--config", "config_path", type=click.Path(), help="TOML file ([export] table).")
def export(base, encoder, out, unet, lora_scale, fp16, fp16_vae, opset, networks, force,
           model_id, engines, ort_unet, config_path):  # fmt: skip
    """Export the Chinese encoder, UNet and VAE decoder to a validated ONNX model directory.

    \b
    Each network is exported with the dynamo exporter, checked against PyTorch in ONNX Runtime
    at two shapes, and written atomically; unchanged networks are kept (--force redoes them).
    Settings come from defaults < iap-rt.toml [export] (or --config) < these options.
    """
    from iap_rt.export.config import resolve_export_config
    from iap_rt.export.stage import run_export
    from iap_rt.extras import require

    cfg = resolve_export_config(
        config_path,
        base=base,
        encoder=encoder,
        out=out,
        unet=unet,
        lora_scale=lora_scale,
        fp16=fp16,
        fp16_vae=fp16_vae,
        opset=opset,
        networks=networks,
        force=force,
        model_id=model_id,
        engines=engines,
        ort_unet=ort_unet,
    )
    if cfg.engines != "only":  # --engines only builds from the ONNX already there
        require("export", "export")
    run_export(cfg, echo=click.echo)
