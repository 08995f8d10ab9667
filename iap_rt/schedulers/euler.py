# Port of diffusers/src/diffusers/schedulers/scheduling_euler_discrete.py (diffusers v0.42.1),
# EulerDiscreteScheduler with its defaults: interpolation_type="linear", no Karras /
# exponential / beta sigmas, timestep_type="discrete", final_sigmas_type="zero", s_churn=0.
"""Euler sampler on the Karras sigmas (Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv:2206.00364, Algorithm 2 with no churn)."""

from __future__ import annotations

import numpy as np

from iap_rt.errors import InputError
from iap_rt.schedulers.base import (
    NumpyScheduler,
    SchedulerConfig,
    leading_timesteps,
    trailing_timesteps,
)


class EulerDiscreteScheduler(NumpyScheduler):
    """Euler steps x_{i+1} = x_i + d_i (sigma_{i+1} - sigma_i) with d_i = (x_i - D(x_i)) / sigma_i."""

    name = "euler"

    def __init__(self, config: SchedulerConfig | None = None):
        super().__init__(config)
        # sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), float32 like diffusers' table
        ac = self.alphas_cumprod
        self._train_sigmas = np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float32)
        t_train = self.config.num_train_timesteps
        self.timesteps = np.arange(t_train, dtype=np.float32)[::-1].copy()
        self.sigmas = np.concatenate([self._train_sigmas[::-1], [0.0]]).astype(np.float32)
        self._step_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = float(self.sigmas.max())
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1.0) ** 0.5

    def _set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n, t_train = num_inference_steps, cfg.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, t_train - 1, n, dtype=np.float32)[::-1].copy()
        elif cfg.timestep_spacing == "leading":
            ts = leading_timesteps(n, t_train, cfg.steps_offset).astype(np.float32)
        else:  # "trailing"
            ts = trailing_timesteps(n, t_train).astype(np.float32)
        ts = self._checked_timesteps(ts)
        # interpolation_type="linear": sigma at (possibly fractional) t, linear in t
        sigmas = np.interp(ts, np.arange(t_train), self._train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # final sigma: zero
        self.timesteps = ts
        self._step_index = None

    def _init_step_index(self, timestep) -> int:
        if self._step_index is None:
            idx = self._index_for_timestep(timestep)
            if idx is None:
                raise InputError(
                    f"timestep {timestep!r} is not one of the scheduler's timesteps.",
                    fix="pass the entries of scheduler.timesteps, in order.",
                )
            self._step_index = idx
        return self._step_index

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        # The UNet sees x / sqrt(sigma^2 + 1), i.e. the variance-preserving x_t.
        self._require_timesteps()
        sigma = float(self.sigmas[self._init_step_index(timestep)])
        return (sample / (sigma**2 + 1.0) ** 0.5).astype(sample.dtype, copy=False)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        # Karras et al. Algorithm 2 with S_churn = 0 (gamma = 0). Notation (<variable> -> <paper>):
        # - sigma -> sigma_i (noise level of the current sample x_i)
        # - sigma_hat -> hat-sigma_i = sigma_i * (1 + gamma_i) = sigma_i here
        # - pred_original_sample -> D_theta(hat-x_i; hat-sigma_i), the denoised estimate
        # - derivative -> d_i = (hat-x_i - D_theta) / hat-sigma_i
        # - dt -> sigma_{i+1} - hat-sigma_i
        # - prev_sample -> x_{i+1}
        self._require_timesteps()
        i = self._init_step_index(timestep)
        sigma = float(self.sigmas[i])
        sigma_hat = sigma  # no churn: gamma = 0

        # 1. denoised estimate from the model output
        if self.config.prediction_type == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        else:  # "v_prediction"
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1.0) ** 0.5) + sample / (
                sigma**2 + 1.0
            )

        # 2. ODE derivative and one Euler step to the next noise level
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = float(self.sigmas[i + 1]) - sigma_hat
        prev_sample = sample + derivative * dt

        self._step_index = i + 1
        return prev_sample.astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        # x = x_0 + sigma_i * noise (the Karras parametrisation the loop runs in)
        self._require_timesteps()
        return (original + noise * self.sigmas[index]).astype(np.float32)
