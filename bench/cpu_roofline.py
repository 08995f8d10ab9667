"""CPU roofline: how close the SD 1.5 UNet step runs to this CPU's fp32 peak, per backend.

    python bench/cpu_roofline.py [--arch sd15|tiny] [--threads 2] [--torch-result F]
                                 [--ort-result F] [--out F]

1. Work: the fp32 FLOPs of one UNet call with guidance (batch 2, 64x64 latents = 512x512,
   77x768 context), counted by ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device
   diffusers ``UNet2DConditionModel`` built from the SD 1.5 config, with diffusers'
   ``AttnProcessor`` (explicit ``baddbmm``/``bmm``) so that attention is counted too (SDPA
   kernels are not).
2. Ceiling: the best fp32 throughput this CPU's kernels reach on large, friendly shapes with
   ``--threads`` threads: a 4096^3 MatMul on ONNX Runtime (MLAS) and in torch, and one SD 1.5
   3x3 convolution (2x320x64x64 -> 320) on ONNX Runtime (NCHWc).
3. Achieved: the committed ``iap-rt bench --arch sd15`` medians (``unet_step_s``) for
   ``torch`` and ``ort`` on the same machine, as GFLOP/s and as a fraction of the ceiling;
   and what the issue's 2x target would need.

Writes ``bench/results/cpu_roofline_sd15.json``. ``--arch tiny`` (the smoke test's size) does
the same for the tiny test UNet (8x8 latents, 32x32 context) with small kernels and the
committed ``bench_tiny.json`` medians; its figures say nothing about the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# arch -> the UNet call (latent side, context S x D), the kernel sizes of the ceiling, and the
# committed `iap-rt bench` results (torch, ort) it is compared with
ARCHS = {
    "sd15": {
        "latent": 64,
        "context": (77, 768),
        "matmul": 4096,
        "conv": (320, 64),  # channels, side
        "torch_result": "bench_sd15_cpu_quiet.json",
        "ort_result": "bench_sd15_cpu_quiet_ortmha.json",
    },
    "tiny": {
        "latent": 8,
        "context": (32, 32),
        "matmul": 256,
        "conv": (32, 8),
        "torch_result": "bench_tiny.json",
        "ort_result": "bench_tiny.json",
    },
}


def unet_flops(arch: str = "sd15") -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    if arch == "sd15":
        from iap_rt.train.sd15 import SD15_UNET as config
    else:
        from iap_rt.train.tiny import TINY_UNET as config

    side, (s, d) = ARCHS[arch]["latent"], ARCHS[arch]["context"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        args = (torch.randn(2, 4, side, side), torch.tensor([500, 500]), torch.randn(2, s, d))
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*args)
    by_op = {str(k): v / 1e9 for k, v in counter.get_flop_counts()["Global"].items()}
    return {"total_gflop": counter.get_total_flops() / 1e9, "by_op_gflop": by_op}


def _best_of(fn, repeat: int = 5) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _ort_session(nodes, inputs, outputs, threads: int, initializers=()):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def kernel_ceilings(threads: int, arch: str = "sd15") -> dict:
    import torch
    from onnx import TensorProto, helper, numpy_helper

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    n = ARCHS[arch]["matmul"]
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    gemm_flop = 2 * n**3

    def vi(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    mm = _ort_session(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        [vi("a", [n, n]), vi("b", [n, n])],
        [vi("c", [n, n])],
        threads,
    )
    ort_gemm = gemm_flop / _best_of(lambda: mm.run(None, {"a": a, "b": b})) / 1e9
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch_gemm = gemm_flop / _best_of(lambda: ta @ tb) / 1e9

    # the most common SD 1.5 convolution at 512x512: 3x3, 320 -> 320 channels, 64x64, batch 2
    c, side = ARCHS[arch]["conv"]
    x = rng.standard_normal((2, c, side, side), dtype=np.float32)
    w = numpy_helper.from_array(rng.standard_normal((c, c, 3, 3), dtype=np.float32), "w")
    conv = _ort_session(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        [vi("x", [2, c, side, side])],
        [vi("y", [2, c, side, side])],
        threads,
        [w],
    )
    conv_flop = 2 * 2 * c * c * 9 * side * side
    ort_conv = conv_flop / _best_of(lambda: conv.run(None, {"x": x})) / 1e9
    return {
        "threads": threads,
        f"ort_matmul_{n}_gflops": ort_gemm,
        f"torch_matmul_{n}_gflops": torch_gemm,
        f"ort_conv3x3_{c}_{side}x{side}_gflops": ort_conv,
        "ceiling_gflops": max(ort_gemm, torch_gemm, ort_conv),
    }


def achieved(result_file: Path, backend: str, flop: float, ceiling: float) -> dict:
    doc = json.loads(result_file.read_text())
    (row,) = [r for r in doc["results"] if r["backend"] == backend]
    step = row["unet_step_s"]
    source = result_file.resolve()
    return {
        "source": str(source.relative_to(ROOT) if source.is_relative_to(ROOT) else source),
        "unet_step_s": step,
        "gflops": flop / step,
        "fraction_of_ceiling": flop / step / ceiling,
    }


def main(argv: list[str] | None = None) -> int:
    from iap_rt.bench.machine import machine_info
    from iap_rt.fileio import write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-result", type=Path, help="[the arch's committed bench result]")
    ap.add_argument("--ort-result", type=Path, help="[the arch's committed bench result]")
    ap.add_argument("--out", type=Path, help="[bench/results/cpu_roofline_ARCH.json]")
    a = ap.parse_args(argv)
    arch = ARCHS[a.arch]
    a.torch_result = a.torch_result or RESULTS / arch["torch_result"]
    a.ort_result = a.ort_result or RESULTS / arch["ort_result"]
    a.out = a.out or RESULTS / f"cpu_roofline_{a.arch}.json"

    work = unet_flops(a.arch)
    ceil = kernel_ceilings(a.threads, a.arch)
    flop = work["total_gflop"]
    torch_row = achieved(a.torch_result, "torch", flop, ceil["ceiling_gflops"])
    ort_row = achieved(a.ort_result, "ort", flop, ceil["ceiling_gflops"])
    target_step = torch_row["unet_step_s"] / 2
    doc = {
        "machine": machine_info(),
        "config": {
            "unet": {"sd15": "SD 1.5", "tiny": "tiny"}[a.arch],
            "batch": 2,
            "latents": [arch["latent"]] * 2,
            "context": list(arch["context"]),
        },
        "flops": work,
        "kernels": ceil,
        "achieved": {"torch": torch_row, "ort": ort_row},
        "target_2x": {
            "unet_step_s": target_step,
            "needs_gflops": flop / target_step,
            "needs_fraction_of_ceiling": flop / target_step / ceil["ceiling_gflops"],
            "step_at_ceiling_s": flop / ceil["ceiling_gflops"],
        },
        "command": " ".join(
            ["python bench/cpu_roofline.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    write_text_atomic(a.out, json.dumps(doc, indent=1) + "\n")
    side = arch["latent"]
    print(f"UNet step (batch 2, {side}x{side}): {flop:.4g} GFLOP")
    kernels = ", ".join(f"{k} {v:.0f}" for k, v in ceil.items() if k.endswith("_gflops"))
    print(f"ceiling ({a.threads} threads, GFLOP/s): {kernels}")
    for name, row in (("torch", torch_row), ("ort", ort_row)):
        print(
            f"{name:5s} {row['unet_step_s']:.3g} s/step = {row['gflops']:.0f} GFLOP/s "
            f"({100 * row['fraction_of_ceiling']:.0f}% of ceiling)"
        )
    t = doc["target_2x"]
    print(
        f"2x torch = {t['unet_step_s']:.3g} s/step needs {t['needs_gflops']:.0f} GFLOP/s "
        f"({100 * t['needs_fraction_of_ceiling']:.0f}% of ceiling; "
        f"a step at the ceiling takes {t['step_at_ceiling_s']:.3g} s)"
    )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
