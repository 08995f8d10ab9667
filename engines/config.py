"""``EngineConfig``: the settings of ``iap-rt engines build`` (the ``[engines]`` table), and
the optimisation profiles they mean for each network of a model directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from iap_rt.config import opt
from iap_rt.enginedir import FLAVOURS, profile_label
from iap_rt.errors import ConfigError
from iap_rt.specs import DERIVED_AXES, DYNAMIC_AXES, NETWORKS, ModelDims, NetworkSpec

DYNAMIC_BATCH = "1:4"  # what --dynamic means where --batch/--resolution are not given
DYNAMIC_RESOLUTION = "256:1024"
DEFAULT_SIZE = 512  # SD 1.5's native size, where a model directory records none


@dataclass(frozen=True)
class EngineConfig:
    """Settings of ``iap-rt engines build`` (the ``[engines]`` table)."""

    flavour: str = opt(
        "auto", "TensorRT flavour: auto (what is installed; tensorrt where a GPU is visible, "
        "else tensorrt_rtx), tensorrt or tensorrt_rtx",
    )  # fmt: skip
    height: int | None = opt(
        None, "image height in pixels the engines are optimised for (multiple of 8); unset = "
        "the model's native size (manifest image_size, 512 for SD 1.5)",
    )  # fmt: skip
    width: int | None = opt(None, "image width in pixels (multiple of 8); unset = native size")
    batch: str = opt(
        "1", "images per prompt: '1' (static) or 'MIN:MAX' (dynamic, e.g. '1:4'); the text "
        "encoder and UNet see twice this under guidance",
    )  # fmt: skip
    resolution: str = opt(
        "", "dynamic image size 'MIN:MAX' pixels for both sides (e.g. '256:768'); empty = "
        "static height x width",
    )  # fmt: skip
    dynamic: bool = opt(False, f"shorthand for batch {DYNAMIC_BATCH!r} and resolution "
                        f"{DYNAMIC_RESOLUTION!r} where those are left at their defaults")  # fmt: skip
    guidance: bool = opt(True, "engines for classifier-free guidance (UNet/text batch 2B)")
    networks: str = opt("", "comma-separated networks to build, e.g. 'unet'; empty = all three")
    compute_capabilities: str = opt(
        "", "TensorRT-RTX target GPUs, e.g. '8.6,8.9' or 'current'; empty = its portable "
        "default (compute capabilities 8.6, 8.9 and 12.0). Full TensorRT always targets this GPU",
    )  # fmt: skip
    optimization_level: int = opt(3, "builder optimisation level 0-5 (higher: slower build)")
    workspace_mb: int = opt(0, "builder workspace limit in MiB; 0 = TensorRT's default")
    timing_cache: bool = opt(True, "keep a timing cache per GPU in engines/<gpu-tag>/ "
                             "(full TensorRT; TensorRT-RTX does not time tactics)")  # fmt: skip
    detailed_profile: bool = opt(False, "keep detailed layer information in the engines "
                                 "(engine inspector, the fused-attention check)")  # fmt: skip
    cuda_graph: bool = opt(False, "capture the UNet step in a CUDA graph when the TensorRT "
                           "backend runs these engines (a runtime hint, not part of the engine)")  # fmt: skip

    # ---- validation and derived values --------------------------------------------------
    def checked(self, dims: ModelDims, image_size: int = DEFAULT_SIZE) -> EngineConfig:
        """Validate against the model (``ConfigError`` naming the rule); --dynamic applied,
        unset height/width filled with the model's native ``image_size``."""
        cfg = dataclasses.replace(
            self,
            height=image_size if self.height is None else self.height,
            width=image_size if self.width is None else self.width,
        )
        if cfg.dynamic:
            cfg = dataclasses.replace(
                cfg,
                batch=self.batch if self.batch != "1" else DYNAMIC_BATCH,
                resolution=self.resolution or DYNAMIC_RESOLUTION,
            )
        if cfg.flavour not in ("auto", *FLAVOURS):
            raise ConfigError(
                f"engines flavour {cfg.flavour!r} is unknown",
                fix=f"use auto, {', '.join(FLAVOURS)}.",
            )
        cfg.network_names()
        if not 0 <= cfg.optimization_level <= 5:
            raise ConfigError(
                f"optimization_level {cfg.optimization_level} is outside 0-5", fix="use 0 to 5."
            )
        f = dims.vae_scale_factor
        for side in ("height", "width"):
            v = getattr(cfg, side)
            if v <= 0 or v % f:
                raise ConfigError(
                    f"engine {side} {v} is not a positive multiple of {f} (the VAE's scale factor)",
                    fix=f"pass --{side} as a multiple of {f}, e.g. 512.",
                )
        cfg.batch_range()
        lo, hi = cfg.resolution_range(dims)
        for side in ("height", "width"):
            if not lo <= getattr(cfg, side) <= hi:
                raise ConfigError(
                    f"engine {side} {getattr(cfg, side)} lies outside the resolution range "
                    f"{cfg.resolution}",
                    fix=f"pass --{side} within {lo}-{hi} or widen --resolution.",
                )
        cfg.rtx_targets()
        return cfg

    @property
    def size(self) -> tuple[int, int]:
        """(height, width); unset sides are SD 1.5's 512 until :meth:`checked` fills them."""
        h, w = self.height, self.width
        return (DEFAULT_SIZE if h is None else h), (DEFAULT_SIZE if w is None else w)

    def network_names(self, available=None) -> list[str]:
        """The networks to build: the option's list, or every network the model has
        (``available``; None: every network of the contract)."""
        available = list(NETWORKS) if available is None else list(available)
        names = [n.strip() for n in self.networks.split(",") if n.strip()] or available
        unknown = [n for n in names if n not in NETWORKS]
        if unknown:
            raise ConfigError(
                f"engines networks: unknown {unknown}", fix=f"choose from {', '.join(NETWORKS)}."
            )
        absent = [n for n in names if n not in available]
        if absent:
            raise ConfigError(
                f"engines networks: the model has no {', '.join(absent)}",
                fix=f"add it first (iap-rt export ... --networks {','.join(absent)}), or build "
                f"{', '.join(available)}.",
            )
        return [n for n in NETWORKS if n in names]

    def batch_range(self) -> tuple[int, int]:
        lo, hi = _parse_range(self.batch, "batch", "1:4")
        if lo < 1:
            raise ConfigError(f"batch {self.batch!r} must be >= 1", fix="e.g. --batch 1 or 1:4.")
        return lo, hi

    def resolution_range(self, dims: ModelDims) -> tuple[int, int]:
        """Pixel range of both sides (static: the larger/smaller of height and width)."""
        if not self.resolution:
            h, w = self.size
            return min(h, w), max(h, w)
        lo, hi = _parse_range(self.resolution, "resolution", "256:768")
        f = dims.vae_scale_factor
        if lo <= 0 or lo % f or hi % f:
            raise ConfigError(
                f"resolution {self.resolution!r}: both ends must be positive multiples of {f}",
                fix="e.g. --resolution 256:768.",
            )
        return lo, hi

    def rtx_targets(self) -> tuple[str, ...]:
        """Compute capabilities ('8.6', ...) for TensorRT-RTX; () = its portable default."""
        raw = self.compute_capabilities.strip()
        if not raw:
            return ()
        if raw == "current":
            return ("current",)
        out = []
        for part in raw.split(","):
            part = part.strip()
            major, dot, minor = part.partition(".")
            if not (major.isdigit() and dot and minor.isdigit()):
                raise ConfigError(
                    f"compute capability {part!r} is not MAJOR.MINOR",
                    fix="e.g. --compute-capability 8.6,8.9 (or 'current').",
                )
            out.append(f"{int(major)}.{int(minor)}")
        return tuple(sorted(set(out), key=lambda t: tuple(map(int, t.split(".")))))

    def axis_ranges(self, dims: ModelDims) -> dict[str, list[int]]:
        """``{axis: [min, opt, max]}`` for B, N, h, w (opt = the smallest batch, height/width)."""
        b_lo, b_hi = self.batch_range()
        r_lo, r_hi = self.resolution_range(dims)
        f = dims.vae_scale_factor
        n = 2 if self.guidance else 1
        return {
            "B": [b_lo, b_lo, b_hi],
            "N": [n * b_lo, n * b_lo, n * b_hi],
            "h": [r_lo // f, self.size[0] // f, r_hi // f],
            "w": [r_lo // f, self.size[1] // f, r_hi // f],
        }

    def profile(self, spec: NetworkSpec, dims: ModelDims) -> dict:
        """One network's profile: the axes it uses, TensorRT shapes, its file-name label.

        UNet: N = 2B under guidance (B without); VAE decoder: B; text encoder: N from 1 to
        2B, because the pipeline encodes each distinct prompt once (see ``Pipeline.encode``).
        """
        ranges = self.axis_ranges(dims)
        used = []
        for t in spec.inputs:
            for a in t.axes:
                key = DERIVED_AXES.get(a, a)
                if key in DYNAMIC_AXES and key not in used:
                    used.append(key)
        axes = {a: ranges[a] for a in sorted(used, key=DYNAMIC_AXES.index)}
        if spec.name == "text_encoder":
            # the pipeline encodes the *distinct* prompts of a request in one call: 1 or 2
            # under guidance (a cached or identical negative prompt drops one), whatever B is
            n = 2 if self.guidance else 1
            axes["N"] = [1, n, n * ranges["B"][2]]
        lo = {a: v[0] for a, v in axes.items()}
        op = {a: v[1] for a, v in axes.items()}
        hi = {a: v[2] for a, v in axes.items()}
        shapes = {k: [list(s) for s in v] for k, v in spec.profile(dims, lo, op, hi).items()}
        return {"axes": axes, "shapes": shapes, "label": profile_label(axes)}

    def rebuild_args(self) -> str:
        """The options that reproduce these engines (used in "rebuild with" messages)."""
        h, w = self.size
        args = [f"--height {h} --width {w} --batch {self.batch}"]
        if self.resolution:
            args.append(f"--resolution {self.resolution}")
        if not self.guidance:
            args.append("--no-guidance")
        if self.compute_capabilities:
            args.append(f"--compute-capability {self.compute_capabilities}")
        return " ".join(args)


def _parse_range(text: str, what: str, example: str) -> tuple[int, int]:
    parts = str(text).strip().split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or nums[0] > nums[1]:
        raise ConfigError(
            f"{what} {text!r} is not N or MIN:MAX with MIN <= MAX", fix=f"e.g. --{what} {example}."
        )
    return nums[0], nums[1]
