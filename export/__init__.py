"""The export stage (``iap_rt.export``, the repository's ``export/`` folder).

A diffusers SD pipeline directory + a ``chinese_encoder/`` -> an iap-rt model directory: the
Chinese text encoder, UNet and VAE decoder as ONNX (fp32, or fp16 with ``--fp16``), each
validated against PyTorch in ONNX Runtime, with attention in the MatMul-Softmax-MatMul form
TensorRT fuses, plus the UNet's ONNX Runtime variant with fused attention for big models. The
directory's format is owned by :mod:`iap_rt.modeldir`; this stage only writes it.

Extra: ``pip install 'iap-rt[export]'`` (torch, diffusers, transformers, onnx, onnxscript;
install torch first, pinned). Entry points: ``iap-rt export`` (:mod:`iap_rt.export.cli`),
:func:`iap_rt.export.stage.export_model_dir`, :func:`iap_rt.export.stage.run_export`.

Benchmark pieces: ``iap-rt bench`` exports its ``tiny``/``sd15`` models through this stage
(:mod:`iap_rt.bench.sources`); the real-size export benchmark is ``bench/export_sd15.py``,
its result ``bench/results/export_sd15.json``.
"""
