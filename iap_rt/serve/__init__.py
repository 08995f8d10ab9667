"""``iap-rt serve``: the model as a service on Triton Inference Server.

::

    protocol.py   the Triton model's contract (name, tensors, one row = one image)
    triton_model.py  the Triton callable: groups queued rows into multi-prompt Pipeline calls
    triton.py     starting Triton through PyTriton (dynamic batcher, instances, libpython)
    upstream.py   the gateway's async gRPC client of one or more Triton servers
    openai_api.py the OpenAI-compatible request parsing, limits and error shape
    metrics.py    Prometheus text metrics of the gateway
    gateway.py    the FastAPI application (images API, health, metrics, the web page)
    launcher.py   the process tree: Triton + gateway, signals, graceful shutdown
    cli.py        the ``iap-rt serve`` command
    web/          the web page (no external assets)

Nothing here imports torch: serving needs the base install plus the ``[serve]`` extra. What a
request means is :mod:`iap_rt.requests`. Benchmark pieces: the load test is
``bench/serve_load.py`` (``bench/results/serve_*.json``).
"""
