"""The ``iap-rt serve`` command: options -> ``ServeConfig`` -> the launcher."""

from __future__ import annotations

import logging
import os
import sys

import click

from iap_rt.config import ServeConfig, config_options, load_config


@click.command("serve")
@config_options(ServeConfig)
@click.option(
    "--config", "config_path", type=click.Path(), help="Workspace TOML (default ./iap-rt.toml)."
)
def serve(config_path, **options):
    """Serve the model: Triton Inference Server + an OpenAI-compatible HTTP gateway.

    \b
    Triton (through PyTriton) runs the model `iap_rt` with a dynamic batcher: requests that
    share steps, scheduler and size are generated in one UNet batch, each image equal to
    `iap-rt generate` with the same prompt and seed. The gateway answers:
      POST /v1/images/generations   OpenAI images API (+ negative_prompt, seed, steps,
                                    guidance_scale, scheduler); images as b64_json PNGs
      GET  /                        a web page        GET /healthz  /readyz  /metrics
    \b
    Examples:
      iap-rt serve                                   # embedded model on 127.0.0.1:8000
      iap-rt serve --model model/ --host 0.0.0.0 --api-key-file key.txt
      iap-rt serve --no-gateway --host 0.0.0.0       # Triton alone, one per GPU node
      iap-rt serve --triton-url gpu1:8002 --triton-url gpu2:8002   # gateway in front
      curl -s localhost:8000/v1/images/generations -H 'Content-Type: application/json' \\
           -d '{"prompt": "左边有一个红色的圆", "n": 2, "seed": 7}'

    SIGTERM stops accepting requests, answers those in flight, and exits 0.
    Settings also come from the [serve] table of iap-rt.toml.
    """
    from iap_rt.serve.launcher import serve as run

    cfg = load_config(ServeConfig, "serve", config_path, options)
    code = run(cfg)  # the gateway and Triton have stopped, in-flight requests answered
    # Leave without the interpreter's finalisation: after the local tritonserver died, the
    # C++ destructors of PyTriton's and gRPC's threads abort the process ("terminate called
    # without an active exception", SIGABRT, a core dump) instead of exiting with ``code``.
    # Everything that needs closing has been closed by now; flush what is buffered and go.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
