# Port of diffusers/src/diffusers/schedulers/scheduling_ddim.py (diffusers v0.42.1),
# DDIMScheduler with eta=0 (deterministic DDIM), no thresholding, no zero-SNR rescaling.
"""DDIM (Song et al., "Denoising Diffusion Implicit Models", arXiv:2010.02502), eta = 0."""

from __future__ import annotations

import numpy as np

from iap_rt.schedulers.base import (
    NumpyScheduler,
    SchedulerConfig,
    leading_timesteps,
    trailing_timesteps,
)


class DDIMScheduler(NumpyScheduler):
    """Deterministic DDIM: x_{t-1} = sqrt(a_{t-1}) x0_pred + sqrt(1 - a_{t-1}) eps_pred."""

    name = "ddim"

    def __init__(self, config: SchedulerConfig | None = None):
        super().__init__(config)
        # alpha-bar of the step "after" the last one: 1 (set_alpha_to_one) or alpha-bar_0.
        self.final_alpha_cumprod = (
            1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])
        )

    def _set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n, t_train = num_inference_steps, cfg.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, t_train - 1, n).round()[::-1].astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ts = leading_timesteps(n, t_train, cfg.steps_offset)
        else:  # "trailing"
            ts = trailing_timesteps(n, t_train)
        self.timesteps = self._checked_timesteps(ts.copy())

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        # See formula (12) of the DDIM paper. Notation (<variable name> -> <name in paper>):
        # - alpha_prod_t -> alpha_t (the paper's alpha is diffusers' cumulative alpha-bar)
        # - alpha_prod_t_prev -> alpha_{t-1}
        # - pred_epsilon -> epsilon_theta(x_t, t)
        # - pred_original_sample -> f_theta(x_t, t), the "predicted x_0"
        # - std_dev_t -> sigma_t (= 0 here: eta = 0)
        # - pred_sample_direction -> "direction pointing to x_t"
        # - prev_sample -> x_{t-1}
        self._require_timesteps()
        cfg = self.config
        t = int(timestep)

        # 1. previous timestep: diffusers always steps back by T // n, whatever the spacing
        prev_t = t - cfg.num_train_timesteps // self.num_inference_steps

        # 2. alphas, betas (float64 scalars from the float32 table)
        alpha_prod_t = float(self.alphas_cumprod[t])
        alpha_prod_t_prev = (
            float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t = 1.0 - alpha_prod_t

        # 3. predicted original sample and predicted noise, formula (12)
        if cfg.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            pred_epsilon = model_output
        else:  # "v_prediction"
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample

        # 4. clip "predicted x_0" (clip_sample_range = 1.0)
        if cfg.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -1.0, 1.0)

        # 5. "direction pointing to x_t" of formula (12), sigma_t = 0
        pred_sample_direction = (1.0 - alpha_prod_t_prev) ** 0.5 * pred_epsilon

        # 6. x_{t-1} without the "random noise" term of formula (12)
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
        return prev_sample.astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        # q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I), float32 like diffusers
        self._require_timesteps()
        a = self.alphas_cumprod[int(self.timesteps[index])]
        sqrt_a, sqrt_1ma = np.float32(a) ** np.float32(0.5), (np.float32(1) - a) ** np.float32(0.5)
        return (sqrt_a * original + sqrt_1ma * noise).astype(np.float32)
