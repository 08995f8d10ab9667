"""Training throughput and peak memory of ``pivot`` vs ``full`` vs ``denoise`` (CPU).

Each objective runs in its own subprocess, so ``peak_rss_mb`` (VmHWM, reset by exec) is that
objective's alone. A child builds the UNet (random weights from its config), the Chinese
encoder (BERT from its config) and AdamW, then times whole optimizer steps through the
trainer's own code (``IapUNet`` + ``objective_loss`` + backward + clip + AdamW) on a fixed
batch of random latents / English embeddings (the trainer reads these from its cache, so
the VAE and CLIP are not part of a step).

    nice -n 10 python bench/train_bench.py --arch tiny    # -> bench/results/train_tiny.json
    nice -n 10 python bench/train_bench.py --arch sd15    # -> bench/results/train_sd15.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from iap_rt.bench.machine import machine_info, peak_rss_mb

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = {
    # resolution, batch size, timed steps, warm-up steps, Chinese tokens
    "tiny": dict(resolution=64, batch_size=8, steps=60, warmup=5, max_length=32),
    "sd15": dict(resolution=256, batch_size=1, steps=3, warmup=1, max_length=77),
}


def child(arch: str, objective: str, a: dict, threads: int) -> dict:
    """Build the models and time ``warmup + steps`` optimizer steps of one objective."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import BertConfig

    from iap_rt.train.encoder import ChineseTextEncoder
    from iap_rt.train.objectives import IapUNet, objective_loss
    from iap_rt.train.sd15 import BERT_BASE_CHINESE, SD15_UNET
    from iap_rt.train.tiny import SD15_SCHEDULER, TINY_BERT, TINY_UNET

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet_cfg, bert_cfg = (
        (TINY_UNET, TINY_BERT) if arch == "tiny" else (SD15_UNET, BERT_BASE_CHINESE)
    )
    unet = UNet2DConditionModel(**unet_cfg).eval().requires_grad_(False)
    d = unet.config.cross_attention_dim
    bert = BertConfig(**{k: v for k, v in bert_cfg.items() if k != "model_type"})
    encoder = ChineseTextEncoder(bert, projection_dim=d, max_length=a["max_length"]).train()
    sched = DDPMScheduler.from_config(SD15_SCHEDULER)
    iap = IapUNet(unet, "all")
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-5)
    setup_mb = peak_rss_mb()

    b, h = a["batch_size"], a["resolution"] // 8
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 4, h, h, generator=g)  # (B, 4, h, w)
    noise = torch.randn(b, 4, h, h, generator=g)  # (B, 4, h, w)
    t = torch.randint(0, 1000, (b,), generator=g)  # (B,)
    batch = {
        "latents": latents,
        "noise": noise,
        "t": t,
        "x_t": sched.add_noise(latents, noise, t),  # (B, 4, h, w)
        "en": torch.randn(b, 77, d, generator=g),  # (B, 77, D) English CLIP states
        "zh_ids": torch.randint(1, bert.vocab_size, (b, a["max_length"]), generator=g),
        "zh_mask": torch.ones(b, a["max_length"], dtype=torch.long),
    }
    times, losses = [], []
    for _ in range(a["warmup"] + a["steps"]):
        t0 = time.perf_counter()
        loss, _ = objective_loss(objective, iap, sched, encoder, batch, False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = sorted(times[a["warmup"] :])
    s_per_step = timed[len(timed) // 2]  # median: robust to other jobs on a shared CPU
    return {
        "objective": objective,
        "samples_per_s": b / s_per_step,
        "s_per_step": s_per_step,
        "s_per_step_mean": sum(timed) / len(timed),
        "s_per_step_min": min(timed),
        "s_per_step_max": max(timed),
        "peak_rss_mb": peak_rss_mb(),
        "setup_rss_mb": setup_mb,  # after building UNet, encoder, AdamW
        "train_rss_mb": peak_rss_mb() - setup_mb,  # what the training steps added on top
        "steps_timed": len(timed),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "encoder_params_m": sum(p.numel() for p in encoder.parameters()) / 1e6,
        "cross_attention_layers": len(iap.layers),
    }


def machine(threads: int) -> dict:
    """The shared machine record plus this benchmark's torch settings."""
    import torch

    return {**machine_info(), "torch_threads": threads, "torch": torch.__version__,
            "device": "cpu", "niceness": os.nice(0)}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    p.add_argument("--objectives", default="pivot,full,denoise")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child")
    p.add_argument("--steps", type=int, help="timed steps (default per arch)")
    p.add_argument("--out", help="result JSON (default bench/results/train_<arch>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    a = dict(ARCHS[args.arch])
    if args.steps:
        a["steps"] = args.steps
    if args.child:
        print(json.dumps(child(args.arch, args.child, a, args.threads)))
        return
    results = []
    for obj in args.objectives.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--arch",
            args.arch,
            "--child",
            obj,
            "--threads",
            str(args.threads),
            "--steps",
            str(a["steps"]),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{obj} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print(
            f"{obj:8s} {res['samples_per_s']:.3g} samples/s  {res['s_per_step']:.3g} s/step  "
            f"peak RSS {res['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    by = {r["objective"]: r for r in results}
    ratios = {}
    if "pivot" in by and "full" in by:
        ratios["pivot_over_full_samples_per_s"] = (
            by["pivot"]["samples_per_s"] / by["full"]["samples_per_s"]
        )
        ratios["pivot_over_full_peak_rss"] = by["pivot"]["peak_rss_mb"] / by["full"]["peak_rss_mb"]
    report = {
        "machine": machine(args.threads),
        "config": {
            "kind": "train",
            "arch": args.arch,
            "resolution": a["resolution"],
            "batch_size": a["batch_size"],
            "steps_timed": a["steps"],
            "warmup_steps": a["warmup"],
            "zh_max_length": a["max_length"],
            "en_max_length": 77,
            "layers": "all",
            "note": "random weights from configs; fixed random batch; one process per "
            "objective; samples_per_s from the median step time",
        },
        "results": results,
        "ratios": ratios,
    }
    out = Path(args.out) if args.out else RESULTS / f"train_{args.arch}.json"
    from iap_rt.fileio import write_json_atomic

    write_json_atomic(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
