"""What a runtime backend provides: one runner per network, numpy in, numpy out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import numpy as np

from iap_rt.modeldir import ModelDir
from iap_rt.specs import CORE_NETWORKS


class NetworkRunner(Protocol):
    """Runs one network. ``feeds`` follow the network's spec (``iap_rt.specs``)."""

    name: str

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(ABC):
    """A way to run a model directory's networks (ONNX Runtime, TensorRT)."""

    name: str = "?"

    @property
    @abstractmethod
    def device(self) -> str:
        """Where the networks run, e.g. ``cpu`` or ``cuda:0 (NVIDIA H100)``."""

    @abstractmethod
    def load(self, model: ModelDir, networks=CORE_NETWORKS) -> dict[str, NetworkRunner]:
        """Create one runner per network of ``networks`` of ``model`` (the core networks by
        default; the optional ones on demand)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions / device memory."""
