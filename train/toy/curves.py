"""Learning curves (``iap-rt toy curves``): binding accuracy against CPU time and samples seen.

Per objective, one run on 10 % of the triples (seed 0) with the long budget (``LONG_FACTOR`` x
the grid's), keeping :data:`~.transfer.CURVE_POINTS` evenly spaced checkpoints; the grid's
``denoise`` run on 100 % (seed 0) keeps checkpoints the same way and is drawn beside them.
Every checkpoint's encoder is exported and evaluated like a grid cell (same held-out prompts,
same noise); step 0 is the untrained encoder. The x axes are *derived*: CPU seconds = step x
the objective's calibrated CPU seconds per step, samples = step x batch.

Writes ``curves/<run>_<step>.json`` per point (resumable), ``toy_curves.json`` and the plot
``docs/toy_curves.png`` (matplotlib, imported inside :func:`plot`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from iap_rt.fileio import ensure_dir, write_json_atomic
from iap_rt.train.toy import transfer
from iap_rt.train.toy.report import base_used
from iap_rt.train.toy.workdir import run_workers

CURVE_FRACTION = "10pct"
MODULE = "iap_rt.train.toy.curves"


def checkpoint_encoder(run_dir: Path, ckpt: Path, out: Path) -> Path:
    """A ``chinese_encoder/`` directory holding checkpoint ``ckpt``'s encoder weights."""
    from safetensors.torch import load_file, save_file

    from iap_rt.fileio import atomic_path

    final = run_dir / "chinese_encoder"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(final, out, ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(str(ckpt / "encoder.safetensors"))
    if any(k.startswith("projection.") for k in state):
        raise ValueError("checkpoint_encoder: encoders with a projection are not supported")
    weights = {k.removeprefix("encoder."): v for k, v in state.items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp))
    return out


def curve_points(spec: dict) -> list[dict]:
    """Train the run (unless done) and evaluate each checkpoint; one JSON per point."""
    from iap_rt.train.checkpoint import list_checkpoints

    work, base = Path(spec["work"]), Path(spec["base"])
    run_dir = Path(spec["run_dir"])
    if not (run_dir / "cell_train.json").is_file():
        data_file = Path(spec["data"]) / f"train_{spec['fraction']}.jsonl"
        transfer.train_run(
            spec, run_dir, spec["steps"], data_file, spec.get("checkpoints", transfer.CURVE_POINTS)
        )
    points = []
    for step, ckpt in list_checkpoints(run_dir):
        res_path = work / "curves" / f"{spec['name']}_{step:06d}.json"
        if not res_path.is_file():
            enc = checkpoint_encoder(run_dir, ckpt, work / "curve_encoders" / spec["name"])
            model = work / "models" / f"curve_{spec['name']}"
            transfer.export_model(base, enc, model, like=work / "models" / "template")
            res = transfer.evaluate_model(model, work, spec["eval"])
            write_json_atomic(res_path, {
                "objective": spec["objective"], "fraction": spec["fraction"],
                "seed": spec["seed"], "step": step, "cpu_s": step * spec["s_per_step"],
                "samples": step * spec["batch"], **res,
            })  # fmt: skip
        points.append(json.loads(res_path.read_text("utf-8")))
    write_json_atomic(work / "curves" / f"{spec['name']}.done.json", {"points": len(points)})
    return points


def untrained_cell(common: dict, seed: int) -> dict:
    """The untrained encoder's scores (every curve's step 0): the grid's cell, evaluated here
    first when the grid has not run in this work dir."""
    path = Path(common["work"]) / "cells" / f"s{seed}_untrained.json"
    if not path.is_file():
        transfer.run_cell(common | {"objective": "untrained", "fraction": "0pct", "seed": seed})
    return json.loads(path.read_text("utf-8"))


def run_curves(
    data_dir, base, work, results="bench/results", plot_path="docs/toy_curves.png",
    budget_s: float = 180.0, batch: int = 64, jobs: int = 2, seed: int = 0, log=print,
) -> dict:  # fmt: skip
    """Every objective's 10 % curve + the grid's long ``denoise`` run; aggregate and plot.

    The grid's long ``denoise`` run and its untrained cell (step 0) are reused where
    ``iap-rt toy transfer`` made them in ``work``, else made here: the curves need no grid."""
    data, base, work = Path(data_dir), Path(base), Path(work)
    ev = transfer.default_eval()
    common, spp = transfer.prepare(data, base, work, (seed,), batch, ev, jobs, log)
    long_budget = transfer.LONG_FACTOR * budget_s
    specs = []
    for o in transfer.OBJECTIVES:
        name = f"{CURVE_FRACTION}_s{seed}_{o}"
        specs.append(common | {
            "name": name, "objective": o, "fraction": CURVE_FRACTION, "seed": seed,
            "steps": max(1, int(long_budget / spp[o])), "s_per_step": spp[o],
            "run_dir": str(work / "curve_runs" / name),
        })  # fmt: skip
    grid_long = f"{transfer.LONG_FRACTION}_s{seed}_{transfer.LONG_OBJECTIVE}"
    specs.append(common | {
        "name": grid_long, "objective": transfer.LONG_OBJECTIVE, "fraction": transfer.LONG_FRACTION,
        "seed": seed, "steps": max(1, int(long_budget / spp[transfer.LONG_OBJECTIVE])),
        "s_per_step": spp[transfer.LONG_OBJECTIVE], "run_dir": str(work / "runs" / grid_long),
    })  # fmt: skip
    # "curve_" keeps the workers' specs/ and logs/ files apart from the grid cells' of that name
    tasks = [("curve", f"curve_{s['name']}", s, work / "curves" / f"{s['name']}.done.json")
             for s in specs]  # fmt: skip
    ensure_dir(work / "curves")
    run_workers(tasks, work, jobs, log, module=MODULE)
    untrained = untrained_cell(common, seed)
    english = json.loads((work / "english.json").read_text("utf-8"))
    curves = []
    for s in specs:
        pts = [json.loads(p.read_text("utf-8"))
               for p in sorted((work / "curves").glob(f"{s['name']}_*.json"))]  # fmt: skip
        start = {"step": 0, "cpu_s": 0.0, "samples": 0} | {
            k: untrained[k]
            for k in ("binding", "objects", "agreement", "colour", "shape", "relation")
            if k in untrained
        }
        curves.append({"objective": s["objective"], "fraction": s["fraction"], "seed": seed,
                       "s_per_step_cpu": s["s_per_step"], "points": [start, *pts]})  # fmt: skip
    record = {"base_used": base_used(work), "budget_cpu_s": long_budget, "batch_size": batch,
              "english_binding": english["binding"], "english_objects": english.get("objects"),
              "curves": curves}  # fmt: skip
    write_json_atomic(Path(results) / "toy_curves.json", record)
    plot(record, Path(plot_path))
    return record


COLOURS = {"pivot": "tab:blue", "full": "tab:orange", "embed": "tab:green",
           "denoise": "tab:red"}  # fmt: skip


METRICS = {"binding": "binding (held-out two-object prompts)",
           "objects": "objects (binding without the relation)"}  # fmt: skip


def plot(record: dict, out: Path) -> Path:
    """Binding vs CPU seconds and vs samples seen, one line per run; a second row for
    ``objects`` when every point has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS
               if all(m in p for c in record["curves"] for p in c["points"])]  # fmt: skip
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 4.2 * len(metrics)), sharey="row",
                             squeeze=False)  # fmt: skip
    for row, metric in zip(axes, metrics):
        for c in record["curves"]:
            pts = c["points"]
            label = f"{c['objective']} @ {c['fraction'].removesuffix('pct')} %"
            style = "--" if c["fraction"] == "100pct" else "-"
            for ax, key in zip(row, ("cpu_s", "samples")):
                ax.plot([p[key] for p in pts], [p[metric] for p in pts], style, marker="o",
                        ms=3, color=COLOURS[c["objective"]], label=label)  # fmt: skip
        for ax, xlabel in zip(row, ("training CPU seconds (1 thread)", "samples seen")):
            english = record.get(f"english_{metric}")
            if english is not None:
                ax.axhline(english, color="black", lw=1, ls=":", label="English base")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        row[1].set_xscale("symlog", linthresh=1000)
        row[1].set_xlim(left=0)  # symlog would show an empty negative half
        row[0].set_ylabel(METRICS[metric])
        row[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Toy world: Chinese encoders against a frozen English base", fontsize=11)
    fig.tight_layout()
    ensure_dir(out.parent)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":  # worker: python -m iap_rt.train.toy.curves curve SPEC
    spec = json.loads(Path(sys.argv[2]).read_text("utf-8"))
    import torch

    torch.set_num_threads(1)
    os.environ["IAP_RT_THREADS"] = "1"  # ONNX Runtime too: one thread per run
    print(json.dumps(curve_points(spec)))
