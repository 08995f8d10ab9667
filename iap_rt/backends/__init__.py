"""Runtime backends: ONNX Runtime (``ort``, always installed) and TensorRT (``trt``, lazily)."""

from __future__ import annotations

from iap_rt.errors import ConfigError

BACKENDS = ("auto", "ort", "trt")


def get_backend(name: str, model=None, **options):
    """Return a backend instance. ``auto`` picks TensorRT when engines for this GPU exist
    in ``model`` and TensorRT is importable, else ONNX Runtime."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}", fix=f"use one of {', '.join(BACKENDS)}.")
    if name == "auto":
        name = "ort"
        if model is not None:
            from iap_rt.enginedir import engines_usable

            if engines_usable(model):
                name = "trt"
    if name == "trt":
        from iap_rt.backends.trt import TensorRTBackend

        return TensorRTBackend(**options)
    from iap_rt.backends.ort import OrtBackend

    return OrtBackend(**options)
