"""The iap-rt exception hierarchy.

Every error a user can cause is an :class:`IapRtError`. Its message says what failed
(expected vs found where that applies) and ``fix`` says the command or change that
repairs it. The CLI prints ``str(err)`` (message + fix) and exits non-zero; ``--debug``
shows the traceback.
"""

from __future__ import annotations


class IapRtError(Exception):
    """Base class of every error iap-rt raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message} Fix: {self.fix}"
        return self.message


class ConfigError(IapRtError):
    """A configuration value, option or config file is invalid."""

    exit_code = 2


class InputError(IapRtError):
    """A generation/training input (prompt, size, steps, data file, ...) is invalid."""

    exit_code = 2


class ArtifactError(IapRtError):
    """A file the tool reads (model directory, engine, checkpoint) is unusable."""


class ArtifactNotFoundError(ArtifactError):
    """A required file or directory does not exist."""


class ArtifactMismatchError(ArtifactError):
    """A file exists but was made for another spec, precision, TensorRT or GPU."""


class ShapeContractError(IapRtError):
    """A tensor does not match the network's declared shape contract."""


class ExportValidationError(IapRtError):
    """The exported ONNX does not match PyTorch within tolerance."""

    def __init__(self, mismatches: list[dict], fix: str | None = None):
        lines = [
            f"  {m['network']}.{m['output']} @ {m.get('case', '?')}: max abs diff "
            f"{m['max_abs_diff']:.3g} > tolerance {m['tolerance']:.3g}"
            for m in mismatches
        ]
        super().__init__(
            f"{len(mismatches)} exported output(s) disagree with PyTorch:\n" + "\n".join(lines),
            fix,
        )
        self.mismatches = mismatches


class EngineBuildError(IapRtError):
    """TensorRT could not parse or build an engine."""


class BackendUnavailableError(IapRtError):
    """The requested backend (TensorRT, CUDA execution provider, ...) is not installed/usable."""


class OutputError(IapRtError):
    """An output path cannot be created or written."""


class ServerError(IapRtError):
    """An ``iap-rt serve`` gateway could not be reached or answered with an error."""


class ResourceError(IapRtError):
    """A call would need more memory than the limit allows (estimated before allocating)."""

    exit_code = 2
