"""Parity of the numpy schedulers with their diffusers originals (torch).

Each case runs diffusers and iap-rt side by side on the same config, the same initial sample
(randn x init_noise_sigma) and the same seeded random "model outputs", each fed its own
previous sample, and compares the timesteps, every scale_model_input output and every
intermediate latent:

* float32: stock diffusers in float32, max abs diff <= 1e-4.
* float64: diffusers with its arithmetic carried out in float64, max abs diff <= 1e-5.
  Stock diffusers is not float64 inside even on float64 tensors: its schedule tables are
  float32 tensors (so every scalar coefficient is computed in float32) and Euler's and
  DPM-Solver's ``step`` cast the sample to float32 (stock float64 diffusers drifts up to
  ~4e-5 from an exact float64 computation over 50 steps). For the float64 run the tables are
  upcast after ``set_timesteps`` (same values, float64 arithmetic) and ``torch.float32`` is
  read as float64 inside those modules, which is the float64 computation the ports do.
"""

from __future__ import annotations

import inspect
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import (  # noqa: E402
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_discrete,
)

from iap_rt.schedulers import SCHEDULERS, SchedulerConfig, make_scheduler  # noqa: E402

# diffusers 0.42 calls np.array() on torch tensors, which numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

SHAPE = (1, 4, 8, 8)
TOL = {np.float64: 1e-5, np.float32: 1e-4}

# The diffusers settings each port fixes (the defaults, spelled out).
_REFERENCE = {
    "ddim": (scheduling_ddim, DDIMScheduler, {}),
    "euler": (
        scheduling_euler_discrete,
        EulerDiscreteScheduler,
        {
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "timestep_type": "discrete",
            "final_sigmas_type": "zero",
        },
    ),
    "dpm++": (
        scheduling_dpmsolver_multistep,
        DPMSolverMultistepScheduler,
        {
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "solver_type": "midpoint",
            "lower_order_final": True,
            "euler_at_final": False,
            "final_sigmas_type": "zero",
        },
    ),
}


def _reference(name: str, cfg: SchedulerConfig):
    _, cls, fixed = _REFERENCE[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in cfg.to_dict().items() if k in accepted}
    return cls(**kwargs, **fixed)


class _Float64Torch:
    """``torch`` as a diffusers scheduler module sees it, with ``torch.float32`` = float64."""

    float32 = torch.float64

    def __getattr__(self, attr):
        return getattr(torch, attr)


def _upcast(name: str, ref, ours, monkeypatch) -> None:
    """Make diffusers' scheduler ``ref`` compute in float64 from the same float32 tables."""
    for attr, value in list(vars(ref).items()):
        if attr != "timesteps" and isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            setattr(ref, attr, value.double())
    if hasattr(ours, "sigmas"):
        # torch's float32 sqrt is not always correctly rounded (numpy's is): ~1 entry in 6 of
        # diffusers' sigma table is one float32 ulp away from the port's. Check that, then use
        # the port's values so the float64 run compares the algorithms, not sqrt roundings.
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1.2e-7, atol=0)
        ref.sigmas = torch.from_numpy(ours.sigmas.astype(np.float64))
    monkeypatch.setattr(_REFERENCE[name][0], "torch", _Float64Torch())


def _run_side_by_side(name, cfg, steps, dtype, monkeypatch, seed) -> float:
    """Denoise with both; assert every intermediate agrees; return the largest diff seen."""
    ours, ref = make_scheduler(name, cfg), _reference(name, cfg)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    ref_timesteps = ref.timesteps.numpy()
    np.testing.assert_array_equal(ours.timesteps, ref_timesteps)
    assert ours.timesteps.dtype == ref_timesteps.dtype
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    if dtype == np.float64:
        _upcast(name, ref, ours, monkeypatch)

    rng = np.random.default_rng(seed)
    x0 = (rng.standard_normal(SHAPE) * ours.init_noise_sigma).astype(dtype)
    x_ours, x_ref = x0, torch.from_numpy(x0.copy())
    tol, worst = TOL[dtype], 0.0
    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):
        assert ours.timestep_input(t_ours) == float(t_ref)
        in_ours, in_ref = (
            ours.scale_model_input(x_ours, t_ours),
            ref.scale_model_input(x_ref, t_ref),
        )
        assert in_ours.dtype == dtype
        diff = float(np.abs(in_ours - in_ref.numpy()).max())
        assert diff <= tol, f"scale_model_input at step {i} (t={t_ours}): max abs diff {diff:.3g}"
        worst = max(worst, diff)

        out = rng.standard_normal(SHAPE).astype(dtype)
        x_ours = ours.step(out, t_ours, x_ours)
        x_ref = ref.step(torch.from_numpy(out), t_ref, x_ref).prev_sample
        assert x_ours.dtype == dtype
        diff = float(np.abs(x_ours - x_ref.numpy()).max())
        assert diff <= tol, f"latent after step {i} (t={t_ours}): max abs diff {diff:.3g}"
        worst = max(worst, diff)
    return worst


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("steps", [1, 2, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_parity_with_diffusers(name, prediction_type, spacing, steps, monkeypatch):
    cfg = SchedulerConfig(prediction_type=prediction_type, timestep_spacing=spacing)
    for dtype in (np.float64, np.float32):
        with monkeypatch.context() as mp:
            _run_side_by_side(name, cfg, steps, dtype, mp, _seed(name, cfg, steps))


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("ddim", {"set_alpha_to_one": True, "clip_sample": True}),
        # v_prediction: with epsilon and random outputs x0 = x / sqrt(abar) reaches ~600 on
        # this schedule, where 1e-4 is about one float32 ulp
        (
            "ddim",
            {
                "beta_schedule": "linear",
                "beta_start": 0.0001,
                "beta_end": 0.02,
                "prediction_type": "v_prediction",
            },
        ),
        ("euler", {"beta_schedule": "squaredcos_cap_v2", "steps_offset": 0}),
        ("euler", {"num_train_timesteps": 500, "timestep_spacing": "linspace"}),
        ("dpm++", {"beta_schedule": "linear", "steps_offset": 0}),
        ("dpm++", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}),
    ],
)
def test_parity_config_variants(name, overrides, monkeypatch):
    cfg = SchedulerConfig(**overrides)
    for dtype in (np.float64, np.float32):
        with monkeypatch.context() as mp:
            _run_side_by_side(name, cfg, 20, dtype, mp, _seed(name, cfg))


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_noise_schedule_tables_bit_identical(beta_schedule):
    cfg = SchedulerConfig(beta_schedule=beta_schedule)
    ours, ref = make_scheduler("ddim", cfg), _reference("ddim", cfg)
    np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    # sigma = sqrt((1 - abar) / abar): torch's float32 sqrt is not always correctly rounded,
    # numpy's is, so allow one float32 ulp.
    ours_e, ref_e = make_scheduler("euler", cfg), _reference("euler", cfg)
    np.testing.assert_allclose(ours_e.sigmas, ref_e.sigmas.numpy(), rtol=1.2e-7, atol=0)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_trailing_drops_diffusers_spurious_last_timestep(name):
    """Deliberate deviation: for 61 trailing steps diffusers makes 62 timesteps ending in -1."""
    cfg = SchedulerConfig(timestep_spacing="trailing")
    ours, ref = make_scheduler(name, cfg), _reference(name, cfg)
    ours.set_timesteps(61)
    ref.set_timesteps(61)
    ref_ts = ref.timesteps.numpy()
    assert len(ref_ts) == 62 and ref_ts[-1] == -1
    np.testing.assert_array_equal(ours.timesteps, ref_ts[:61])


@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_image_to_image_start_matches_diffusers(name, spacing, strength):
    """Image to image as diffusers runs it: ``set_begin_index(k)``, ``add_noise`` at
    ``timesteps[k]``, then the loop over ``timesteps[k:]`` (float32, stock diffusers)."""
    cfg = SchedulerConfig(timestep_spacing=spacing)
    steps = 20
    ours, ref = make_scheduler(name, cfg), _reference(name, cfg)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    k = steps - min(int(steps * strength), steps)  # diffusers' get_timesteps (order 1)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(k)
    rng = np.random.default_rng(_seed(name, spacing, strength))
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t0 = ref.timesteps[k : k + 1]
    x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t0)
    x_ours = ours.add_noise(x0, noise, k)
    assert x_ours.dtype == np.float32
    np.testing.assert_allclose(x_ours, x_ref.numpy(), rtol=0, atol=1e-5)
    for t_ours, t_ref in zip(ours.timesteps[k:], ref.timesteps[k:]):
        out = rng.standard_normal(SHAPE).astype(np.float32)
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_ref = ref.scale_model_input(x_ref, t_ref)
        np.testing.assert_allclose(in_ours, in_ref.numpy(), rtol=0, atol=1e-4)
        x_ours = ours.step(out, t_ours, x_ours)
        x_ref = ref.step(torch.from_numpy(out), t_ref, x_ref).prev_sample
        np.testing.assert_allclose(x_ours, x_ref.numpy(), rtol=0, atol=1e-4)
