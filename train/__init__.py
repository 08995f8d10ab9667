"""The training stage (``iap_rt.train``, the repository's ``train/`` folder).

IAP ("images as pivots"): only a Chinese text encoder is trained against a frozen English
Stable Diffusion (UNet, VAE, CLIP text encoder), with the ``pivot`` (default), ``full``,
``embed`` or ``denoise`` objective; the output is a ``chinese_encoder/`` directory the export
stage reads. Also here, because they need torch: the toy world (:mod:`iap_rt.train.toy`), tiny
and SD 1.5-sized models built from configs (:mod:`iap_rt.train.tiny`, :mod:`iap_rt.train.sd15`).

Extra: ``pip install 'iap-rt[train]'`` (torch, diffusers, transformers, accelerate; install
torch first, pinned). Entry points: ``iap-rt train`` (:mod:`iap_rt.train.cli`),
:func:`iap_rt.train.trainer.run`, ``iap-rt toy`` (:mod:`iap_rt.train.toy.cli`).

Benchmark pieces: ``iap-rt bench``'s torch worker and model builder are here
(:mod:`iap_rt.train.bench_torch`, it runs :class:`~iap_rt.train.torch_pipeline.TorchPipeline`);
the bench's orchestration is :mod:`iap_rt.bench`; the training benchmarks are scripts in the
repository's ``bench/`` (``train_bench.py``, ``train_scale.py``) with their results in
``bench/results/``.
"""
