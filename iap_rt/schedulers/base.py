"""Scheduler configuration and the common numpy scheduler base class.

The noise schedule tables (betas, cumulative alphas, Karras sigmas) are built in float32
exactly the way diffusers builds them with torch on CPU, so a port run side by side with
its diffusers original sees the same table values (see ``tests/integration/
test_scheduler_parity.py``). Per-step coefficients are then computed in float64 from those
tables and applied in the sample's own dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from iap_rt.errors import ConfigError, InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers config keys that change the schedule or the update in a way these ports do not
# implement. from_dict accepts them only with the value listed here (their neutral value).
_NEUTRAL_VALUES: dict[str, Any] = {
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
    "thresholding": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def _choice_error(field: str, value: Any, valid: tuple[str, ...]) -> ConfigError:
    return ConfigError(
        f"scheduler {field} {value!r} is not supported; valid values: {', '.join(valid)}.",
        fix=f"set {field} to one of: {', '.join(valid)}.",
    )


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The subset of a diffusers scheduler config the numpy schedulers use.

    Field names and meanings are diffusers'; the defaults are Stable Diffusion 1.x's
    ``scheduler/scheduler_config.json``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    timestep_spacing: str = "leading"

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise _choice_error("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.prediction_type not in PREDICTION_TYPES:
            raise _choice_error("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise _choice_error("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        n = self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ConfigError(
                f"scheduler num_train_timesteps must be an integer >= 2, got {n!r}.",
                fix="use the value from the model's scheduler_config.json (usually 1000).",
            )
        s = self.steps_offset
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(
                f"scheduler steps_offset must be an integer >= 0, got {s!r}.",
                fix="use the value from the model's scheduler_config.json (usually 1 or 0).",
            )
        if not (0.0 < self.beta_start < 1.0 and 0.0 < self.beta_end < 1.0):
            raise ConfigError(
                f"scheduler beta_start and beta_end must lie in (0, 1), got "
                f"{self.beta_start!r} and {self.beta_end!r}.",
                fix="use the values from the model's scheduler_config.json.",
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Build from a diffusers ``scheduler_config.json`` dict.

        Keys this config does not have (``_class_name``, ``skip_prk_steps``, ...) are ignored,
        except the few in ``_NEUTRAL_VALUES``, which must hold their neutral value because
        ignoring them would silently change the schedule.
        """
        for key, neutral in _NEUTRAL_VALUES.items():
            if key in d and d[key] != neutral:
                raise ConfigError(
                    f"scheduler config sets {key}={d[key]!r}, which iap-rt's schedulers do not "
                    f"support (only {neutral!r}).",
                    fix=f"remove {key} from the scheduler config or set it to {neutral!r}.",
                )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- noise schedule tables (float32, bit-identical to diffusers' torch CPU construction) ---


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` on CPU, bit for bit.

    torch computes a float32 step, then ``start + step*i`` for the first half and
    ``end - step*(n-1-i)`` for the second, each with a single rounding (fused multiply-add).
    """
    s, e = np.float32(start), np.float32(end)
    step = (e - s) / np.float32(n - 1)
    i = np.arange(n, dtype=np.float64)
    lo = np.float64(s) + np.float64(step) * i
    hi = np.float64(e) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar`` with the cosine transform (squaredcos_cap_v2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def make_betas(config: SchedulerConfig) -> np.ndarray:
    """The float32 beta schedule of ``config`` (length num_train_timesteps)."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return _torch_linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        return _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    return _betas_for_alpha_bar(n)


def make_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """Float32 cumulative product of ``1 - betas``; torch's CPU cumprod accumulates in float64."""
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def leading_timesteps(
    num_inference_steps: int, num_train_timesteps: int, offset: int
) -> np.ndarray:
    """``timestep_spacing="leading"``: multiples of T // n plus steps_offset, descending."""
    step_ratio = num_train_timesteps // num_inference_steps
    return np.arange(num_inference_steps, dtype=np.int64)[::-1] * step_ratio + offset


def trailing_timesteps(num_inference_steps: int, num_train_timesteps: int) -> np.ndarray:
    """``timestep_spacing="trailing"``: rounded T, T - T/n, ... minus one, descending.

    Deviation from diffusers: its float ``np.arange`` yields n + 1 values for some n (61, 103,
    121, ... of 1000), the last one rounding to timestep -1 (which DDIM then reads as
    alphas_cumprod[-1]); only the first n are kept here, identical to diffusers' otherwise.
    """
    step_ratio = num_train_timesteps / num_inference_steps
    ts = np.arange(num_train_timesteps, 0, -step_ratio)[:num_inference_steps]
    return np.round(ts).astype(np.int64) - 1


class NumpyScheduler:
    """Common interface of the numpy schedulers.

    Usage mirrors diffusers: ``set_timesteps(n)``, start from noise times
    ``init_noise_sigma``, then for each ``t`` in ``timesteps``: feed the UNet
    ``scale_model_input(x, t)`` at timestep ``timestep_input(t)`` and advance with
    ``x = step(model_output, t, x)``.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config if config is not None else SchedulerConfig()
        self.betas = make_betas(self.config)
        self.alphas_cumprod = make_alphas_cumprod(self.betas)
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray = np.arange(self.config.num_train_timesteps)[::-1].copy()

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise the denoising loop starts from."""
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the ``num_inference_steps`` timesteps (descending) and reset any state."""
        n = num_inference_steps
        t_max = self.config.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= t_max:
            raise ConfigError(
                f"num_inference_steps must be an integer in [1, {t_max}], got {n!r}.",
                fix=f"pass a step count between 1 and {t_max} (num_train_timesteps).",
            )
        self.num_inference_steps = int(n)
        self._set_timesteps(int(n))

    def _set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def _checked_timesteps(self, timesteps: np.ndarray) -> np.ndarray:
        """``timesteps`` if strictly descending within [0, num_train_timesteps); else ConfigError.

        diffusers silently produces such schedules at the edges (e.g. "leading" with
        steps_offset=1 and 1000 steps gives timestep 1000, DPM-Solver "leading" with 1000 steps
        repeats timestep 1); iap-rt refuses them.
        """
        cfg = self.config
        t_max = cfg.num_train_timesteps - 1
        if timesteps.min() < 0 or timesteps.max() > t_max or np.any(np.diff(timesteps) >= 0):
            self.num_inference_steps = None
            raise ConfigError(
                f"scheduler {self.name} with timestep_spacing={cfg.timestep_spacing!r}, "
                f"steps_offset={cfg.steps_offset} and num_inference_steps={len(timesteps)} gives "
                f"timesteps outside [0, {t_max}] or repeated ones "
                f"(from {timesteps[0]} down to {timesteps[-1]}).",
                fix="use fewer inference steps, or timestep_spacing='trailing'.",
            )
        return timesteps

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """The UNet input for ``sample`` at ``timestep`` (identity unless overridden)."""
        return sample

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        """Advance ``sample`` from ``timestep`` to the next timestep; returns prev_sample."""
        raise NotImplementedError

    def timestep_input(self, timestep) -> float:
        """The timestep value the UNet is conditioned on for schedule entry ``timestep``.

        (Image to image starts the loop at ``timesteps[k]``: the schedule's entries are
        distinct, so every scheduler finds its place from the first timestep it is given.)"""
        return float(timestep)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        """``original`` noised to the level of ``timesteps[index]`` (diffusers' ``add_noise``
        with ``set_begin_index(index)``): where image to image starts its loop."""
        raise NotImplementedError

    # --- helpers for subclasses ---

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise InputError(
                f"{type(self).__name__}.step called before set_timesteps.",
                fix="call set_timesteps(num_inference_steps) before the denoising loop.",
            )

    def _index_for_timestep(self, timestep) -> int | None:
        """Position of ``timestep`` in ``self.timesteps`` (the second match if repeated,
        as diffusers picks for img2img), or None when absent."""
        hits = np.flatnonzero(self.timesteps == timestep)
        if len(hits) == 0:
            return None
        return int(hits[1] if len(hits) > 1 else hits[0])
