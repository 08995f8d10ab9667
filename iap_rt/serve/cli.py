"""The ``iap-rt serve`` command: options -> ``ServeConfig`` -> the launcher."""

from __future__ import annotations

import sys

import click

from iap_rt.config import ServeConfig, load_config


@click.command("serve")
@click.option("--model", help="Model directory (default: workspace, else the embedded model).")
@click.option("--backend", help="auto, ort or trt [auto].")
@click.option("--host", help="Address to listen on; 0.0.0.0 for all interfaces [127.0.0.1].")
@click.option("--port", type=int, help="Gateway HTTP port: API, web page, health [8000].")
@click.option("--triton-http-port", type=int, help="Triton HTTP/REST port [8001].")
@click.option("--triton-grpc-port", type=int, help="Triton gRPC port [8002].")
@click.option("--triton-metrics-port", type=int, help="Triton Prometheus metrics port [8003].")
@click.option(
    "--max-batch", type=int, help="Most images in one UNet batch; 1 turns batching off [8]."
)
@click.option(
    "--max-queue-delay-ms", type=float, help="How long Triton waits to fill a batch [10]."
)
@click.option("--instances", type=int, help="Model instances (pipelines) in Triton [1].")
@click.option(
    "--api-key-file",
    type=click.Path(),
    help="Require 'Authorization: Bearer KEY' with the key in this file.",
)
@click.option(
    "--triton-url",
    multiple=True,
    help="Run only the gateway, against this Triton gRPC HOST:PORT (repeatable).",
)
@click.option(
    "--no-gateway", is_flag=True, default=None, help="Run only Triton (one per GPU node)."
)
@click.option("--max-queue", type=int, help="Images queued or generating before 429 [64].")
@click.option("--timeout-s", type=float, help="Seconds a request may take before 504 [300].")
@click.option("--max-body-bytes", type=int, help="Largest request body [65536].")
@click.option("--max-prompt-chars", type=int, help="Longest prompt or negative prompt [1000].")
@click.option("--max-n", type=int, help="Most images per request, 1-10 [10].")
@click.option("--max-steps", type=int, help="Most denoising steps per request [150].")
@click.option(
    "--max-pixels", type=int, help="Most pixels per request, width x height x n [4194304]."
)
@click.option(
    "--config", "config_path", type=click.Path(), help="Workspace TOML (default ./iap-rt.toml)."
)
def serve(config_path, triton_url, **options):
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

    options["triton_url"] = tuple(triton_url) or None
    cfg = load_config(ServeConfig, "serve", config_path, options)
    sys.exit(run(cfg))
