"""``ExportConfig``: the settings of ``iap-rt export`` (the ``[export]`` table of iap-rt.toml)."""

from __future__ import annotations

import dataclasses
import os

from iap_rt.config import load_config, opt
from iap_rt.errors import ConfigError
from iap_rt.modeldir import DEFAULT_GUIDANCE
from iap_rt.requests import MAX_GUIDANCE
from iap_rt.schedulers import SCHEDULERS
from iap_rt.specs import NETWORKS

# opset 18: torch 2.13's dynamo exporter makes an invalid UNet at 17 (Split num_outputs);
# 18-21 work; 23 emits the ONNX Attention op, which TensorRT-RTX fails to build
# (IAttention::setDecomposable), so the range stops at 21.
DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(18, 22)
ENGINE_MODES = ("auto", "none", "only")


ORT_UNET_MODES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Settings of `iap-rt export` (the [export] table)."""

    base: str | None = opt(None, "local diffusers-format Stable Diffusion directory (required)")
    encoder: str | None = opt(None, "chinese_encoder/ directory written by `iap-rt train`")
    unet: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "a plug-in UNet instead of BASE/unet: a fine-tuned UNet folder (or pipeline "
            "directory) of the same architecture or its inpainting variant (9 input channels: "
            "the model then inpaints with it), or a LoRA .safetensors (diffusers/PEFT) fused "
            "into BASE/unet",
            "path": True,  # relative to the config file
        },
    )
    lora_scale: float = opt(1.0, "strength of a --unet LoRA when it is fused")
    out: str | None = opt(None, "model directory to write or update (swapped in whole when done)")
    fp16: bool = opt(False, "export the text encoder and UNet in fp16 (the VAE stays fp32)")
    fp16_vae: bool = opt(False, "export the VAE decoder in fp16 too (SD VAEs can overflow)")
    opset: int = opt(DEFAULT_OPSET, "ONNX opset, 18-21 (17 breaks the UNet, 23 breaks TensorRT)")
    # `| None` (unset = all) also keeps iap_rt.config._coerce, which cannot check a bare
    # tuple[str, ...] annotation, working
    networks: tuple[str, ...] | None = opt(
        None, 'networks to (re-)export, e.g. ["unet"]; unset = all (the others are kept)'
    )
    force: bool = opt(False, "re-export networks even when their inputs are unchanged")
    model_id: str | None = opt(None, "model id recorded in the manifest; unset = out's name")
    engines: str = opt("auto", "TensorRT engines after export: auto, none or only")
    default_scheduler: str = opt("dpm++", "scheduler `iap-rt generate` uses by default")
    default_guidance: float = opt(
        DEFAULT_GUIDANCE, "guidance scale `iap-rt generate` and `serve` use by default (SD: "
        "7.5; small or distilled models often want less)",
    )  # fmt: skip
    ort_unet: str = opt(
        "auto",
        "also write unet.ort.onnx, the UNet with ONNX Runtime's fused attention for the ort "
        "backend: auto (when the weights are external, i.e. big models), always, never",
    )

    def __post_init__(self):
        problems = []
        if self.opset not in SUPPORTED_OPSETS:
            problems.append(
                f"opset {self.opset} is not supported (use {SUPPORTED_OPSETS.start}-"
                f"{SUPPORTED_OPSETS.stop - 1}: 17 makes an invalid UNet with the dynamo exporter, "
                "23 emits the Attention op TensorRT-RTX cannot build)"
            )
        networks = tuple(NETWORKS) if self.networks is None else tuple(self.networks)
        unknown = [n for n in networks if n not in NETWORKS]
        if unknown or not networks:
            problems.append(
                f"networks {list(networks)}: choose one or more of {', '.join(NETWORKS)}"
            )
        if self.engines not in ENGINE_MODES:
            problems.append(f"engines {self.engines!r}: choose one of {', '.join(ENGINE_MODES)}")
        if self.ort_unet not in ORT_UNET_MODES:
            problems.append(
                f"ort_unet {self.ort_unet!r}: choose one of {', '.join(ORT_UNET_MODES)}"
            )
        if self.default_scheduler not in SCHEDULERS:
            problems.append(
                f"default_scheduler {self.default_scheduler!r}: choose one of "
                f"{', '.join(SCHEDULERS)}"
            )
        if not 0 <= self.default_guidance <= MAX_GUIDANCE:
            problems.append(
                f"default_guidance {self.default_guidance!r}: choose a number from 0 to "
                f"{MAX_GUIDANCE:g}"
            )
        if problems:
            raise ConfigError(
                "invalid export settings: " + "; ".join(problems),
                fix="fix the option or the [export] table of iap-rt.toml.",
            )
        # canonical order, no duplicates: the manifest and the incremental hash depend on it
        object.__setattr__(self, "networks", tuple(n for n in NETWORKS if n in networks))

    def precision(self, network: str) -> str:
        """The precision ``network`` is exported in."""
        if network in ("vae_decoder", "vae_encoder"):
            return "fp16" if self.fp16_vae else "fp32"
        return "fp16" if self.fp16 else "fp32"

    def require_paths(self) -> None:
        """Raise unless base, encoder and out are set (``engines="only"`` needs only out)."""
        names = ("out",) if self.engines == "only" else ("base", "encoder", "out")
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            opts = " ".join(f"--{n} DIR" for n in missing)
            raise ConfigError(
                f"iap-rt export needs {', '.join(missing)}",
                fix=f"pass {opts}, or set {', '.join(missing)} in the [export] table of "
                "iap-rt.toml.",
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_export_config(
    config_path: str | os.PathLike | None = None, **overrides
) -> ExportConfig:
    """Defaults < iap-rt.toml ``[export]`` (or ``--config FILE``) < ``overrides`` (None = unset)."""
    return load_config(ExportConfig, "export", config_path, overrides)
