"""``TrainConfig``: every setting of ``iap-rt train`` (the ``[train]`` table of iap-rt.toml).

Precedence (see :func:`iap_rt.config.load_config`): these defaults < ``iap-rt.toml``/``--config`` <
command-line options. :meth:`TrainConfig.check` validates values that do not need the disk.
A checkpoint stores the resolved config; ``--resume`` refuses one whose *trajectory* fields
(everything but :data:`RESUME_FREE`) differ.
"""

from __future__ import annotations

import dataclasses

from iap_rt.config import opt
from iap_rt.errors import ConfigError

OBJECTIVES = ("pivot", "full", "embed", "denoise", "embed_pos")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("no", "fp16", "bf16")


def _path(help: str):
    """An optional path field (relative paths in a config file resolve against the file)."""
    return dataclasses.field(default=None, metadata={"help": help, "path": True})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of ``iap-rt train`` (IAP: align a Chinese encoder to a frozen English SD)."""

    # ---- inputs / outputs
    base: str | None = opt(None, "diffusers SD pipeline directory (unet/ vae/ text_encoder/ ...)")
    encoder: str | None = opt(None, "HF BERT/RoBERTa directory, chinese_encoder/, or config.json")
    data: str | None = opt(
        None, "JSONL, CSV or Parquet of image,zh,en (image paths relative to the file)"
    )
    out: str | None = opt(None, "output directory (chinese_encoder/, checkpoints/, metrics.jsonl)")
    val_data: str | None = _path(
        "held-out JSONL/CSV/Parquet for validation; unset = hold out val_count"
    )
    cache_dir: str | None = _path("latent + English-embedding cache; unset = OUT/cache")
    # ---- method
    objective: str = opt("pivot", "pivot (IAP, one UNet pass), full, embed or denoise")
    layers: str = opt("all", "cross-attention layers: all, or comma list of down/mid/up/prefixes")
    layer_norm: bool = opt(False, "divide each layer's loss by the English output's mean square")
    caption_dropout: float = opt(0.1, "probability of replacing both captions with ''")
    max_length: int | None = opt(None, "Chinese tokens per caption; unset = encoder's (<= 77)")
    # ---- data
    resolution: int = opt(512, "image side in pixels after resize + centre crop (multiple of 8)")
    max_bad_fraction: float = opt(0.05, "stop with an error when more images than this are bad")
    val_count: int = opt(0, "triples held out of --data for validation (when val_data unset)")
    # ---- optimisation
    max_steps: int = opt(10000, "optimizer steps")
    batch_size: int = opt(8, "samples per process per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-4, "peak AdamW learning rate")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 = off")
    lr_schedule: str = opt("cosine", "cosine (to 0 at max_steps) or constant, after warmup")
    warmup_steps: int = opt(500, "linear warmup steps")
    ema_decay: float = opt(0.0, "EMA decay of the encoder weights (e.g. 0.999); 0 = off")
    mixed_precision: str = opt("no", "no, fp16 or bf16 (GPU only; CPU always trains in fp32)")
    gradient_checkpointing: bool = opt(False, "recompute UNet activations (full, denoise)")
    seed: int = opt(0, "seed of init, data order, noise, timesteps, dropout")
    # ---- bookkeeping
    log_every: int = opt(10, "steps between metrics.jsonl lines")
    val_every: int = opt(500, "steps between validations (0 = off)")
    checkpoint_every: int = opt(1000, "steps between checkpoints (0 = only the final one)")
    keep_checkpoints: int = opt(3, "checkpoints kept (the oldest are deleted)")
    # "| None" because iap_rt.config._coerce cannot check a bare tuple[str, ...] annotation
    sample_prompts: tuple[str, ...] | None = opt(None, "Chinese prompts sampled at validation")
    sample_steps: int = opt(20, "denoising steps of validation samples")

    def check(self) -> None:
        """Validate values (no disk access); raise :class:`ConfigError` naming the rule."""
        for name in ("base", "encoder", "data", "out"):
            if not getattr(self, name):
                raise ConfigError(
                    f"--{name} is required",
                    fix=f"pass --{name} or set `{name}` in the [train] table of iap-rt.toml.",
                )
        _choice("objective", self.objective, OBJECTIVES)
        _choice("lr_schedule", self.lr_schedule, SCHEDULES)
        _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(
                f"resolution {self.resolution} is not a positive multiple of 8",
                fix="pass --resolution 256, 512, 768 ... (SD's VAE downsamples by 8).",
            )
        for name in ("max_steps", "batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "val_count", "log_every", "val_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} = {getattr(self, name)} must be >= 0")
        for name in ("caption_dropout", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} = {getattr(self, name)} must be in [0, 1)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction = {self.max_bad_fraction} must be in [0, 1]")
        if self.lr <= 0:
            raise ConfigError(f"lr = {self.lr} must be > 0")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length = {self.max_length} must be >= 2")


# fields that may change between a checkpoint and --resume without changing the trajectory
# (batch_size and grad_accum: only their product with the number of processes, the global
# batch, matters; checkpoint.prepare_resume checks that)
RESUME_FREE = frozenset(
    {"out", "cache_dir", "log_every", "val_every", "checkpoint_every", "keep_checkpoints"}
    | {"sample_prompts", "sample_steps", "val_data", "val_count", "batch_size", "grad_accum"}
)


def resume_conflicts(saved: dict, cfg: TrainConfig) -> list[str]:
    """Fields whose value differs from the checkpoint's and would change the trajectory."""
    now = dataclasses.asdict(cfg)
    free = set(RESUME_FREE)
    if cfg.lr_schedule == "constant":
        free.add("max_steps")  # a constant schedule does not depend on the horizon
    if not cfg.val_data:
        free.discard("val_count")  # held out of --data: it changes the training rows
    out = []
    for k in sorted(set(now) | set(saved)):
        if k in free:
            continue
        a, b = saved.get(k), now.get(k)
        if isinstance(a, list):
            a = tuple(a)
        if a != b:
            out.append(f"{k}: checkpoint {a!r}, now {b!r}")
    return out


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{name} {value!r} is not one of {', '.join(allowed)}",
            fix=f"set {name} to one of: {', '.join(allowed)}.",
        )
