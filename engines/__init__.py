"""The engines stage: a model directory's ONNX files -> TensorRT engines + sidecars.

Works from ONNX files only, with ``tensorrt`` (>= 10) or ``tensorrt_rtx``; never imports
torch. Entry points: :func:`iap_rt.engines.api.build_engines`,
:func:`iap_rt.engines.api.maybe_build_engines` (``iap-rt export --engines``) and the
``iap-rt engines`` command (:mod:`iap_rt.engines.cli`). The runtime side (sidecar checks,
loading, running) is :mod:`iap_rt.backends.trt`.
"""
