"""The engines stage (``iap_rt.engines``, the repository's ``engines/`` folder).

A model directory's ONNX files -> TensorRT engines + sidecars in ``engines/<gpu-tag>/``.
Works from ONNX files only, with ``tensorrt`` (>= 10) or ``tensorrt_rtx`` (which builds without
a GPU); never imports torch. The engine-artifact format (layout, sidecars, checks) is owned by
:mod:`iap_rt.enginedir`; loading and running engines is :mod:`iap_rt.backends.trt`.

Extra: ``pip install 'iap-rt[trt]'`` (TensorRT-RTX, polygraphy, onnx), or full TensorRT from
NVIDIA (README). Entry points: ``iap-rt engines build|check`` (:mod:`iap_rt.engines.cli`),
:func:`iap_rt.engines.stage.build_engines`, :func:`iap_rt.engines.stage.maybe_build_engines`
(``iap-rt export --engines``).

Benchmark pieces: the engine-build benchmark at SD 1.5 size is ``bench/engine_sd15.py``
(``bench/results/engine_sd15.json``); running engines is timed by ``iap-rt bench --backends
trt`` (:mod:`iap_rt.bench`, worker :mod:`iap_rt.bench.worker`).
"""
