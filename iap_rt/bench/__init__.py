"""``iap-rt bench``: every backend side by side on the same model, prompt, seed and noise.

How a run works (:func:`iap_rt.bench.run.run_bench`):

1. **sources** (:mod:`.sources`): the model directory the runtime backends run, plus the
   diffusers base and the ``chinese_encoder/`` the ``torch`` reference loads. ``tiny`` and
   ``sd15`` are built from configs with random seeded weights (``python -m
   iap_rt.train.bench_torch build``) and exported by ``iap-rt export``, each in its own
   process, into a cache directory (default ``~/.cache/iap-rt/bench``), once; latency does
   not depend on the weight values. ``toy`` needs a trained toy model directory.
2. **one subprocess per backend** (:mod:`.protocol`), one after the other, so that each
   backend's peak RSS (``VmHWM``) is its own and no backend warms another's caches; each
   under its ``--timeout`` (killed past it and reported ``timed_out``), the result JSON
   written after every backend (``complete: false`` until the last). The
   ``ort``/``trt`` workers (``python -m iap_rt.bench.worker``) never import torch; the
   ``torch``/``torch-compile`` worker is ``python -m iap_rt.train.bench_torch worker``, which
   runs :class:`iap_rt.train.torch_pipeline.TorchPipeline`.
3. in each worker: load (session creation / model load) + the first image = **cold start**;
   then ``warmup - 1`` unmeasured images; then ``repeat`` measured images. Per run the
   pipeline's own timings are kept (text encoder incl. tokenizer, UNet per step, whole loop,
   VAE decode, end to end); the figures reported are medians over the runs (UNet: over every
   step of every run) with ``[min, max]`` spreads (:mod:`.stats`).
4. the parent adds the machine (:mod:`.machine`), the config, each backend's speed-up over
   ``torch`` (``torch time / backend time``) and the final-latents difference to ``torch`` (a
   check that every backend did the same work), and writes the JSON (:mod:`.report`:
   :data:`~iap_rt.bench.report.RESULT_FIELDS`). Each result records the precision of every
   network it ran; torch runs the VAE at the model directory's VAE precision (like for like)
   and, on CUDA, also times the VAE decode at fp16 and fp32 (``vae_decode_by_precision``).

``runtime overhead per step`` = (denoising loop time - UNet time) / steps: the scheduler, the
guidance combination, copies, dtype casts, feed checks and Python. The UNet time is measured
around the runner's ``run`` call, so feed checks inside it count as network time.

Modules: :mod:`.command` (the click command), :mod:`.config` (``BenchConfig``),
:mod:`.sources`, :mod:`.protocol` (parent <-> worker), :mod:`.worker` (the runtime worker),
:mod:`.machine`, :mod:`.stats`, :mod:`.report`, :mod:`.run`. Nothing here imports torch.
"""
