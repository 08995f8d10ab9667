"""CPU roofline: how close the SD 1.5 UNet step runs to this CPU's fp32 peak, per backend.

    python bench/cpu_roofline.py [--threads 2] [--torch-result F] [--ort-result F] [--out F]

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

Writes ``bench/results/cpu_roofline_sd15.json``.
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


def unet_flops() -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from iap_rt.train.sd15 import SD15_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        args = (torch.randn(2, 4, 64, 64), torch.tensor([500, 500]), torch.randn(2, 77, 768))
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


def kernel_ceilings(threads: int) -> dict:
    import torch
    from onnx import TensorProto, helper, numpy_helper

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    n = 4096
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
    x = rng.standard_normal((2, 320, 64, 64), dtype=np.float32)
    w = numpy_helper.from_array(rng.standard_normal((320, 320, 3, 3), dtype=np.float32), "w")
    conv = _ort_session(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        [vi("x", [2, 320, 64, 64])],
        [vi("y", [2, 320, 64, 64])],
        threads,
        [w],
    )
    conv_flop = 2 * 2 * 320 * 320 * 9 * 64 * 64
    ort_conv = conv_flop / _best_of(lambda: conv.run(None, {"x": x})) / 1e9
    return {
        "threads": threads,
        "ort_matmul_4096_gflops": ort_gemm,
        "torch_matmul_4096_gflops": torch_gemm,
        "ort_conv3x3_320_64x64_gflops": ort_conv,
        "ceiling_gflops": max(ort_gemm, torch_gemm, ort_conv),
    }


def achieved(result_file: Path, backend: str, flop: float, ceiling: float) -> dict:
    doc = json.loads(result_file.read_text())
    (row,) = [r for r in doc["results"] if r["backend"] == backend]
    step = row["unet_step_s"]
    return {
        "source": str(result_file.relative_to(ROOT)),
        "unet_step_s": step,
        "gflops": flop / step,
        "fraction_of_ceiling": flop / step / ceiling,
    }


def main(argv: list[str] | None = None) -> int:
    from iap_rt.benchmark import machine_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-result", type=Path, default=RESULTS / "bench_sd15_cpu_quiet.json")
    ap.add_argument("--ort-result", type=Path, default=RESULTS / "bench_sd15_cpu_quiet_ortmha.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_roofline_sd15.json")
    a = ap.parse_args(argv)

    work = unet_flops()
    ceil = kernel_ceilings(a.threads)
    flop = work["total_gflop"]
    torch_row = achieved(a.torch_result, "torch", flop, ceil["ceiling_gflops"])
    ort_row = achieved(a.ort_result, "ort", flop, ceil["ceiling_gflops"])
    target_step = torch_row["unet_step_s"] / 2
    doc = {
        "machine": machine_info(),
        "config": {"unet": "SD 1.5", "batch": 2, "latents": [64, 64], "context": [77, 768]},
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
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"UNet step (batch 2, 64x64): {flop:.0f} GFLOP")
    print(
        f"ceiling ({a.threads} threads): ORT MatMul {ceil['ort_matmul_4096_gflops']:.0f}, "
        f"torch MatMul {ceil['torch_matmul_4096_gflops']:.0f}, "
        f"ORT 3x3 conv {ceil['ort_conv3x3_320_64x64_gflops']:.0f} GFLOP/s"
    )
    for name, row in (("torch", torch_row), ("ort", ort_row)):
        print(
            f"{name:5s} {row['unet_step_s']:.2f} s/step = {row['gflops']:.0f} GFLOP/s "
            f"({100 * row['fraction_of_ceiling']:.0f}% of ceiling)"
        )
    t = doc["target_2x"]
    print(
        f"2x torch = {t['unet_step_s']:.2f} s/step needs {t['needs_gflops']:.0f} GFLOP/s "
        f"({100 * t['needs_fraction_of_ceiling']:.0f}% of ceiling; "
        f"a step at the ceiling takes {t['step_at_ceiling_s']:.2f} s)"
    )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
