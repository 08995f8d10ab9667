"""Pure-numpy ports of the diffusers schedulers the runtime offers (no torch).

``make_scheduler(name, config)`` builds one of :data:`SCHEDULERS`; each is pinned to its
diffusers original by ``tests/integration/test_scheduler_parity.py``.
"""

from __future__ import annotations

from iap_rt.errors import ConfigError
from iap_rt.schedulers.base import NumpyScheduler, SchedulerConfig
from iap_rt.schedulers.ddim import DDIMScheduler
from iap_rt.schedulers.dpm import DPMSolverMultistepScheduler
from iap_rt.schedulers.euler import EulerDiscreteScheduler

_CLASSES: dict[str, type[NumpyScheduler]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
SCHEDULERS: tuple[str, ...] = tuple(_CLASSES)


def make_scheduler(name: str, config: SchedulerConfig | None = None) -> NumpyScheduler:
    """A fresh scheduler ``name`` (one of :data:`SCHEDULERS`) for ``config`` (SD1.x default)."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULERS)}.",
            fix=f"pick one of: {', '.join(SCHEDULERS)}.",
        )
    return cls(config if config is not None else SchedulerConfig())


__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "NumpyScheduler",
    "SchedulerConfig",
    "make_scheduler",
]
