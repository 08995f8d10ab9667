"""TensorRT builds never run Python's garbage collector inside TensorRT's logger callback.

The hang this pins (seen in this suite): ``trt.Builder(logger)`` logs while TensorRT holds its
mutex; an automatic collection inside the Python callback freed an older builder kept alive only
by a reference cycle, and its destructor waited on that mutex for ever. Each case runs in a
child process with a timeout, so a regression fails here instead of hanging the run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("tensorrt_rtx", reason="engine builds need tensorrt-rtx-cu13")

CHILD = textwrap.dedent(
    """
    import gc, sys
    import tensorrt_rtx as trt
    from iap_rt.engines.build import _logger, gc_paused

    class LetGo(list):
        # a verbose sink that, at TensorRT's first message, drops the last plain reference to a
        # cycle holding an older builder: from then on only the collector can free it
        def __init__(self, keep):
            super().__init__()
            self.keep = keep

        def append(self, msg):
            self.keep = None
            junk = [[i] for i in range(1000)]  # allocations: the collector's cue
            super().append(msg)

    old = [trt.Builder(_logger(trt, []))]
    old.append(old)
    sink = LetGo(old)
    del old
    gc.set_threshold(1)  # collect at every allocation, as a long test run eventually does
    create = (lambda: trt.Builder(_logger(trt, [], sink)))
    builder = gc_paused(create)() if sys.argv[1] == "paused" else create()
    print("built", len(sink) > 0)
    """
)


def _child(mode: str, timeout: float) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None


def test_builder_callbacks_run_with_the_collector_paused():
    done = _child("paused", timeout=120)
    assert done is not None, "TensorRT builder creation hung with the collector paused"
    assert done.returncode == 0 and "built True" in done.stdout, done.stderr[-2000:]


def test_without_the_pause_the_same_builder_hangs():
    """The reproduction is real: the same child without :func:`gc_paused` deadlocks."""
    assert _child("plain", timeout=20) is None, (
        "no hang without the pause: this TensorRT no longer deadlocks here, so gc_paused may "
        "have become unnecessary (keep it while tensorrt>=10 builds are supported)"
    )


def test_every_builder_entry_point_is_paused():
    from iap_rt.engines import build

    for fn in (build.build_engine, build.fused_softmaxes):
        assert fn.__wrapped__ is not None and fn.__code__ is not fn.__wrapped__.__code__
