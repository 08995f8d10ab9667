"""What each optional part of iap-rt needs installed, and the one-line error when it is not.

The runtime (``iap-rt generate``) needs only the base install. The stages need extras
(``pyproject.toml``): a command checks its extra up front with :func:`require`, before any
work, so an install without torch answers ``iap-rt train`` with the command that fixes it
instead of a traceback halfway through. Packages are looked up without importing them.
"""

from __future__ import annotations

import importlib.util

from iap_rt.errors import BackendUnavailableError

# extra -> the import names it provides that its commands need
EXTRAS = {
    "train": ("torch", "diffusers", "transformers", "accelerate", "safetensors"),
    "export": ("torch", "diffusers", "transformers", "safetensors", "onnx", "onnxscript"),
    "trt": ("polygraphy", "onnx"),
    "serve": ("pytriton", "tritonclient", "fastapi", "uvicorn"),
}
TORCH_EXTRAS = ("train", "export")
TORCH_FIRST = (
    "install torch first, pinned to the build for your machine (CPU: pip install torch==2.13.0; "
    "a GPU: the CUDA build from pytorch.org), then "
)
# a stage package (iap_rt.<name>) -> where it lives in a checkout
STAGE_PACKAGES = {
    "iap_rt.train": "train/",
    "iap_rt.export": "export/",
    "iap_rt.engines": "engines/",
}


def missing(extra: str) -> list[str]:
    """The packages of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` (with the pinned-torch step for torch extras)."""
    cmd = f"pip install 'iap-rt[{extra}]'"
    return (TORCH_FIRST + cmd) if extra in TORCH_EXTRAS else cmd


def require(extra: str, command: str) -> None:
    """Raise :class:`BackendUnavailableError` naming the missing packages and the install
    command unless everything ``extra`` provides is importable."""
    gone = missing(extra)
    if gone:
        raise BackendUnavailableError(
            f"`iap-rt {command}` needs {', '.join(gone)} (the '{extra}' extra), "
            "which is not installed",
            fix=install_hint(extra) + ".",
        )


def stage_not_installed(module: str) -> str | None:
    """For a missing ``iap_rt.<stage>`` package: why (iap-rt runs from a plain checkout whose
    stage folders are only packages once installed), else None."""
    for pkg, folder in STAGE_PACKAGES.items():
        if module == pkg or module.startswith(pkg + "."):
            return (
                f"the package {pkg} (the {folder} folder of the repository) is not installed: "
                "iap-rt is running from a plain checkout"
            )
    return None
