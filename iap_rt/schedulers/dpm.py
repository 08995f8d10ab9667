# Port of diffusers/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py
# (diffusers v0.42.1), DPMSolverMultistepScheduler as DPM-Solver++ 2M: algorithm_type=
# "dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
# euler_at_final=False, final_sigmas_type="zero", lambda_min_clipped=-inf, no Karras /
# Lu / exponential / beta / flow sigmas, no thresholding, no learned variance.
"""DPM-Solver++(2M) (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv:2211.01095, Algorithm 2), data-prediction multistep solver."""

from __future__ import annotations

import math

import numpy as np

from iap_rt.schedulers.base import NumpyScheduler, SchedulerConfig, trailing_timesteps

SOLVER_ORDER = 2


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the VP process from the Karras sigma = sigma_t / alpha_t."""
    alpha_t = 1.0 / (sigma**2 + 1.0) ** 0.5
    return alpha_t, sigma * alpha_t


def _lambda(alpha_t: float, sigma_t: float) -> float:
    """Half log-SNR lambda_t = log(alpha_t / sigma_t); +inf at sigma_t = 0 (clean data)."""
    return math.log(alpha_t) - math.log(sigma_t) if sigma_t > 0.0 else math.inf


class DPMSolverMultistepScheduler(NumpyScheduler):
    """DPM-Solver++ 2M: second-order multistep in data (x0) prediction, first order at the
    first step and (final sigma zero) at the last step."""

    name = "dpm++"

    def __init__(self, config: SchedulerConfig | None = None):
        super().__init__(config)
        ac = self.alphas_cumprod
        self._train_sigmas = np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float32)
        t_train = self.config.num_train_timesteps
        self.timesteps = np.arange(t_train, dtype=np.int64)[::-1].copy()
        self.sigmas = self._train_sigmas.copy()
        self._reset_state()

    def _reset_state(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * SOLVER_ORDER
        self.lower_order_nums = 0
        self._step_index: int | None = None

    def _set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n, t_train = num_inference_steps, cfg.num_train_timesteps
        # lambda_min_clipped = -inf clips nothing: the last usable timestep is T.
        last_timestep = t_train
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            step_ratio = last_timestep // (n + 1)
            ts = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64)
            ts = ts + cfg.steps_offset
        else:  # "trailing" (last_timestep = T: the shared helper is the same formula)
            ts = trailing_timesteps(n, t_train)
        ts = self._checked_timesteps(ts)
        sigmas = np.interp(ts, np.arange(t_train), self._train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # final sigma: zero
        self.timesteps = ts.copy()
        self._reset_state()

    def _convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The data prediction x_theta(x_t, t) (DPM-Solver++ works on predicted x_0)."""
        alpha_t, sigma_t = _alpha_sigma(float(self.sigmas[self._step_index]))
        if self.config.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output  # "v_prediction"

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray) -> np.ndarray:
        # DPM-Solver++ paper, Algorithm 2. Notation (<variable name> -> <name in paper>):
        # - alpha_t, sigma_t -> alpha_{t_i}, sigma_{t_i} (target time t_i of this step)
        # - alpha_s0, sigma_s0 -> alpha_{t_{i-1}}, sigma_{t_{i-1}} (current sample's time)
        # - lambda_t, lambda_s0, lambda_s1 -> lambda_{t_i}, lambda_{t_{i-1}}, lambda_{t_{i-2}}
        # - h, h_0 -> h_i = lambda_{t_i} - lambda_{t_{i-1}}, h_{i-1}
        # - r0 -> r_i = h_{i-1} / h_i
        # - m0, m1 -> x_theta(x~_{t_{i-1}}, t_{i-1}), x_theta(x~_{t_{i-2}}, t_{i-2})
        # - D0, D1 -> D_i = (1 + 1/(2 r_i)) m0 - 1/(2 r_i) m1, split as D0 + D1 / 2
        # - sample, prev_sample -> x~_{t_{i-1}}, x~_{t_i}
        self._require_timesteps()
        if self._step_index is None:
            idx = self._index_for_timestep(timestep)
            self._step_index = len(self.timesteps) - 1 if idx is None else idx
        i = self._step_index
        n = len(self.timesteps)

        # final_sigmas_type="zero" makes the last step first order (lower_order_final).
        lower_order_final = i == n - 1

        # 1. data prediction; keep the last SOLVER_ORDER of them
        x0_pred = self._convert_model_output(model_output, sample)
        self.model_outputs = [*self.model_outputs[1:], x0_pred]

        alpha_t, sigma_t = _alpha_sigma(float(self.sigmas[i + 1]))
        alpha_s0, sigma_s0 = _alpha_sigma(float(self.sigmas[i]))
        lambda_t = _lambda(alpha_t, sigma_t)
        lambda_s0 = _lambda(alpha_s0, sigma_s0)
        h = lambda_t - lambda_s0
        phi = math.exp(-h) - 1.0  # exp(-h) = 0 when the target is sigma = 0 (h = inf)

        if self.lower_order_nums < 1 or lower_order_final:
            # 2a. first order (DPM-Solver++ 1 = DDIM in x0 prediction)
            prev_sample = (sigma_t / sigma_s0) * sample - (alpha_t * phi) * x0_pred
        else:
            # 2b. second order multistep, midpoint variant
            alpha_s1, sigma_s1 = _alpha_sigma(float(self.sigmas[i - 1]))
            lambda_s1 = _lambda(alpha_s1, sigma_s1)
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            h_0 = lambda_s0 - lambda_s1
            r0 = h_0 / h
            D0, D1 = m0, (1.0 / r0) * (m0 - m1)
            prev_sample = (
                (sigma_t / sigma_s0) * sample - (alpha_t * phi) * D0 - 0.5 * (alpha_t * phi) * D1
            )

        if self.lower_order_nums < SOLVER_ORDER:
            self.lower_order_nums += 1
        self._step_index = i + 1
        return prev_sample.astype(sample.dtype, copy=False)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        # x_t = alpha_t x_0 + sigma_t noise, from sigma = sigma_t / alpha_t (float32, as diffusers)
        self._require_timesteps()
        sigma = self.sigmas[index]
        alpha_t = np.float32(1) / (sigma**2 + np.float32(1)) ** np.float32(0.5)
        return (alpha_t * original + (sigma * alpha_t) * noise).astype(np.float32)
