"""The toy transfer table (``iap-rt toy transfer``): a fresh Chinese encoder per objective.

:func:`run_grid` runs every *cell* (data fraction x seed x objective) of the table:

1. per seed, a character-vocabulary WordPiece tokenizer (``meta.json``'s ``zh_characters``) and
   a freshly initialised BERT-style encoder of the base's cross-attention width (``init_s<seed>``);
   every objective of that seed starts from these weights (the "untrained" row evaluates them);
2. **equal time budget**: each objective's seconds per step are measured once (a short
   calibration run of every objective), and each gets ``budget_s / (s/step)`` steps, so every
   Chinese row trains for about the same wall time on the same data (steps, samples seen and
   the measured training seconds are reported per row);
3. each cell trains (``iap-rt train`` in-process), exports its encoder with ``iap-rt export
   --engines none`` (UNet and VAE reused from a template export) and evaluates on the held-out
   combinations through the torch-free runtime; the English base is evaluated once through
   diffusers from the same numpy initial noise, so agreement-with-English compares like with like;
4. cells run as ``jobs`` one-thread subprocesses and each writes ``cells/<name>.json``; a
   finished cell is not re-run, so an interrupted grid resumes;
5. :func:`aggregate` writes ``<results>/toy_transfer.json`` and ``.md``: mean +- spread over
   seeds per fraction and row.

Torch and the training/export stages are imported inside the functions only.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from iap_rt.errors import ArtifactNotFoundError, InputError
from iap_rt.fileio import write_json_atomic, write_text_atomic
from iap_rt.modeldir import MANIFEST

OBJECTIVES = ("pivot", "full", "embed", "denoise")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def encoder_config(vocab_size: int, width: int, layers: int = 2, max_positions: int = 32) -> dict:
    """A small BERT config (hidden size = the UNet's cross-attention width: no projection)."""
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": vocab_size,
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // 32),
        "intermediate_size": 4 * width,
        "max_position_embeddings": max_positions,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }


def build_init_encoder(data_dir: Path, base: Path, out: Path, seed: int = 0) -> Path:
    """Write ``out`` = vocab.txt + a fresh char-vocab encoder in ``chinese_encoder/`` layout."""
    import torch
    from transformers import BertConfig

    from iap_rt.tokenizer import build_wordpiece_tokenizer
    from iap_rt.train.encoder import ChineseTextEncoder

    chars = json.loads((data_dir / "meta.json").read_text("utf-8"))["zh_characters"]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "vocab.txt", "\n".join([*SPECIAL, *chars]) + "\n")
    tok = build_wordpiece_tokenizer(out / "vocab.txt")
    width = json.loads((base / "unet" / "config.json").read_text())["cross_attention_dim"]
    torch.manual_seed(seed)
    cfg = BertConfig(**encoder_config(len(SPECIAL) + len(chars), width))
    ChineseTextEncoder(cfg, None, max_length=32).save(out, tokenizer=tok)
    return out


def train_objective(
    objective: str, base: Path, init: Path, data: Path, out: Path, steps: int, batch: int, seed: int
) -> dict:
    """``iap-rt train`` in-process; -> its summary (elapsed_s, samples_per_s, final_loss)."""
    from iap_rt.train.config import TrainConfig
    from iap_rt.train.trainer import run

    cfg = TrainConfig(
        base=str(base),
        encoder=str(init),
        data=str(data),
        out=str(out),
        objective=objective,
        resolution=32,
        max_steps=steps,
        batch_size=batch,
        lr=1e-3,
        warmup_steps=max(1, steps // 20),
        val_every=0,
        checkpoint_every=0,
        keep_checkpoints=1,
        seed=seed,
    )
    summary = run(cfg)
    summary.pop("data", None)
    return summary | {"samples_seen": steps * batch}


def export(base: Path, encoder: Path, out: Path, like: Path | None = None) -> None:
    """``iap-rt export --engines none`` in-process. ``like``: an exported directory of the same
    base to start from (its UNet and VAE are unchanged, so only the text encoder is exported)."""
    import dataclasses
    import shutil

    from iap_rt.export.config import resolve_export_config
    from iap_rt.export.stage import run_export

    if like is not None and not out.exists():
        shutil.copytree(like, out)
    cfg = resolve_export_config(None, base=str(base), encoder=str(encoder), out=str(out))
    run_export(dataclasses.replace(cfg, engines="none"), echo=lambda m: None)


ROW_NAMES = {
    "english": "English prompts, base model (upper bound)",
    "untrained": "Chinese, untrained encoder",
    "embed": "Chinese, `embed` baseline",
    "denoise": "Chinese, `denoise` baseline",
    "full": "Chinese, IAP `full`",
    "pivot": "Chinese, IAP `pivot`",
}
ROW_ORDER = ("english", "untrained", "embed", "denoise", "full", "pivot")
METRICS = ("colour", "shape", "position", "all", "agreement", "pixel_mse")


def default_eval() -> dict:
    """Evaluation settings shared by every row (held-out combinations)."""
    return {"seeds_per_combo": 3, "steps": 25, "guidance": 3.0, "scheduler": "ddim"}


def english_reference(base: Path, work: Path, ev: dict) -> dict:
    """Evaluate the English base once (cached in ``work/english.json`` + ``english.npz``)."""
    import numpy as np

    from iap_rt.train.toy.evaluate import diffusers_generator, evaluate

    js, npz = work / "english.json", work / "english.npz"
    if js.is_file() and npz.is_file():
        return json.loads(js.read_text("utf-8"))
    gen = diffusers_generator(base, steps=ev["steps"], guidance=ev["guidance"], numpy_noise=True)
    res, img, _ = evaluate(gen, lang="en", seeds_per_combo=ev["seeds_per_combo"])
    res |= {"agreement": 1.0, "pixel_mse": 0.0}
    work.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(npz, images=img)
    write_json_atomic(js, res)
    return res


def _init_dir(work: Path, seed: int) -> Path:
    return work / f"init_s{seed}"


def run_cell(spec: dict) -> dict:
    """Train (unless ``untrained``), export and evaluate one cell; writes ``cells/<name>.json``.

    ``spec``: data, base, work, fraction, seed, objective, steps, batch, eval (see
    :func:`default_eval`)."""
    import numpy as np

    from iap_rt.train.toy.evaluate import agreement, evaluate, runtime_generator

    data, base, work = Path(spec["data"]), Path(spec["base"]), Path(spec["work"])
    frac, seed, obj, ev = spec["fraction"], spec["seed"], spec["objective"], spec["eval"]
    name = cell_name(frac, seed, obj)
    init = _init_dir(work, seed)
    summary: dict = {}
    if obj == "untrained":
        enc = init / "chinese_encoder" if (init / "chinese_encoder").is_dir() else init
    else:
        run_dir = work / "runs" / name
        summary = train_objective(
            obj,
            base,
            init,
            data / f"train_{frac}.jsonl",
            run_dir,
            spec["steps"],
            spec["batch"],
            seed,
        )
        enc = run_dir / "chinese_encoder"
    model = work / "models" / name
    export(base, enc, model, like=work / "models" / "template")
    gen = runtime_generator(model, steps=ev["steps"], guidance=ev["guidance"])
    res, img, _ = evaluate(gen, lang="zh", seeds_per_combo=ev["seeds_per_combo"])
    en_img = np.load(work / "english.npz")["images"]
    res |= agreement(img, en_img)
    row = {
        "row": obj,
        "fraction": frac,
        "seed": seed,
        **res,
        "steps": spec["steps"] if obj != "untrained" else 0,
        "train_s": summary.get("elapsed_s", 0.0),
        "samples_seen": summary.get("samples_seen", 0),
        "final_loss": summary.get("final_loss"),
        "model": str(model),
    }
    write_json_atomic(_cell_result(work, spec), row)
    return row


def cell_name(fraction: str, seed: int, objective: str) -> str:
    # the untrained encoder does not depend on the fraction; it is evaluated once per seed
    return f"s{seed}_untrained" if objective == "untrained" else f"{fraction}_s{seed}_{objective}"


def _cell_result(work: Path, spec: dict) -> Path:
    return work / "cells" / f"{cell_name(spec['fraction'], spec['seed'], spec['objective'])}.json"


def _calibration_result(work: Path, objective: str) -> Path:
    return work / "calibration" / f"{objective}.json"


def _run_workers(
    tasks: list[tuple[str, str, dict, Path]],
    work: Path,
    jobs: int,
    log,
    module: str = "iap_rt.train.toy.transfer",
    on_done=None,
) -> None:
    """Run ``python -m MODULE MODE SPEC`` for every ``(mode, name, spec, result)`` whose result
    file is missing, as one-thread subprocesses, ``jobs`` at a time; each worker writes its own
    result file, so a finished task is never run again. ``on_done(name)`` after each."""
    todo = [t for t in tasks if not t[3].is_file()]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    (work / "specs").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen, str]] = []
    while todo or running:
        while todo and len(running) < jobs:
            mode, name, spec, _ = todo.pop(0)
            spec_path = work / "specs" / f"{name}.json"
            write_json_atomic(spec_path, spec)
            logf = open(work / "logs" / f"{name}.log", "w")  # noqa: SIM115 (closed with the proc)
            cmd = [sys.executable, "-m", module, mode, str(spec_path)]
            running.append((subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env), name))
            log(f"started {name}")
        time.sleep(0.5)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"{name} failed (exit {proc.returncode}); see {work}/logs/{name}.log"
                    )
                log(f"finished {name}")
                if on_done is not None:
                    on_done(name)


def calibrate(
    data: Path, base: Path, work: Path, batch: int, steps: int = 12, jobs: int = 2, log=print
) -> dict[str, float]:
    """Seconds per optimizer step of every objective (short runs, ``jobs`` in parallel like the
    real grid); cached in ``work/calibration.json``."""
    path = work / "calibration.json"
    if path.is_file():
        return json.loads(path.read_text("utf-8"))
    common = {"data": str(data), "base": str(base), "work": str(work), "fraction": "10pct"}
    tasks = [
        (
            "calibrate",
            f"calibrate_{obj}",
            common | {"seed": 0, "objective": obj, "steps": steps, "batch": batch},
            _calibration_result(work, obj),
        )
        for obj in OBJECTIVES
    ]
    _run_workers(tasks, work, jobs, log)
    out: dict[str, float] = {}
    for obj in OBJECTIVES:
        out[obj] = json.loads(_calibration_result(work, obj).read_text("utf-8"))["s_per_step"]
        log(f"calibrated {obj}: {out[obj]:.3f} s/step")
    write_json_atomic(path, out)
    return out


def _calibrate_one(spec: dict) -> dict:
    """One calibration run; writes and returns ``{"s_per_step": ...}``."""
    work = Path(spec["work"])
    summ = train_objective(
        spec["objective"],
        Path(spec["base"]),
        _init_dir(work, 0),
        Path(spec["data"]) / "train_10pct.jsonl",
        work / "calibration" / spec["objective"],
        spec["steps"],
        spec["batch"],
        0,
    )
    res = {"s_per_step": summ["elapsed_s"] / spec["steps"]}
    write_json_atomic(_calibration_result(work, spec["objective"]), res)
    return res


def run_grid(
    data_dir: str | Path,
    base: str | Path,
    work: str | Path,
    results: str | Path = "bench/results",
    fractions: tuple[str, ...] = ("1pct", "3pct", "10pct"),
    seeds: tuple[int, ...] = (0, 1, 2),
    budget_s: float = 60.0,
    batch: int = 64,
    jobs: int = 2,
    ev: dict | None = None,
    log=print,
) -> dict:
    """Run every cell of the table (resumable) and write the aggregated results."""
    data, base, work = Path(data_dir), Path(base), Path(work)
    ev = ev or default_eval()
    for f in fractions:
        if not (data / f"train_{f}.jsonl").is_file():
            raise ArtifactNotFoundError(
                f"{data / f'train_{f}.jsonl'} is missing", fix=f"iap-rt toy data --out {data}"
            )
    if budget_s <= 0:
        raise InputError(f"--budget-s must be > 0, got {budget_s}")
    work.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        if not (_init_dir(work, s) / "vocab.txt").is_file():
            build_init_encoder(data, base, _init_dir(work, s), s)
    if not (work / "models" / "template" / MANIFEST).is_file():
        export(base, _init_dir(work, seeds[0]), work / "models" / "template")
    log(f"english: {english_reference(base, work, ev)}")
    spp = calibrate(data, base, work, batch, jobs=jobs, log=log)
    steps = {o: max(1, int(budget_s / spp[o])) for o in OBJECTIVES}
    log(f"steps for a {budget_s:.0f} s budget: {steps}")
    common = {"data": str(data), "base": str(base), "work": str(work), "batch": batch, "eval": ev}
    specs = [
        common | {"fraction": fractions[0], "seed": s, "objective": "untrained", "steps": 0}
        for s in seeds
    ]
    for f in fractions:
        for s in seeds:
            for o in OBJECTIVES:
                specs.append(common | {"fraction": f, "seed": s, "objective": o, "steps": steps[o]})
    tasks = [("cell", cell_name(s["fraction"], s["seed"], s["objective"]), s, _cell_result(work, s))
             for s in specs]  # fmt: skip
    _run_workers(tasks, work, jobs, log)
    setup = {
        "budget_s": budget_s,
        "s_per_step": spp,
        "steps": steps,
        "batch_size": batch,
        "lr": 1e-3,
        "seeds": list(seeds),
        "eval": ev | {"combos": "heldout", "noise": "numpy initial_noise"},
        "base": str(base),
        "threads_per_cell": 1,
        "parallel_cells": jobs,
    }
    return aggregate(work, results, fractions, seeds, setup)


def _stats(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "values": values}


def aggregate(work, results, fractions, seeds, setup: dict) -> dict:
    """Mean and spread over seeds of every (fraction, row); writes toy_transfer.json / .md."""
    work, results = Path(work), Path(results)
    english = json.loads((work / "english.json").read_text("utf-8"))
    tables = {}
    for f in fractions:
        rows = [
            {"row": "english", "conditioning": ROW_NAMES["english"], "n": english["n"]}
            | {m: _stats([english[m]]) for m in METRICS}
        ]
        for r in ROW_ORDER[1:]:
            cells = [
                json.loads((work / "cells" / f"{cell_name(f, s, r)}.json").read_text("utf-8"))
                for s in seeds
            ]
            row = {"row": r, "conditioning": ROW_NAMES[r], "n": cells[0]["n"]}
            row |= {m: _stats([c[m] for c in cells]) for m in METRICS}
            row |= {
                k: _stats([float(c[k]) for c in cells])
                for k in ("train_s", "samples_seen", "steps")
            }
            rows.append(row)
        tables[f] = rows
    record = {"setup": setup, "fractions": list(fractions), "tables": tables}
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / "toy_transfer.json", record)
    write_text_atomic(results / "toy_transfer.md", markdown(record))
    return record


def _fmt(st: dict, digits: int = 3) -> str:
    spec = f".{digits}f" if st["mean"] == 0 or st["mean"] >= 10**-digits else ".1e"
    if st["sd"] == 0 and len(st["values"]) == 1:
        return f"{st['mean']:{spec}}"
    return f"{st['mean']:{spec}} ± {st['sd']:{spec}}"


def markdown(record: dict) -> str:
    """The tables as Markdown: mean ± standard deviation over seeds."""
    setup = record["setup"]
    head = (
        "| conditioning | colour | shape | position | all three | agreement w/ English "
        "| pixel MSE | train time (s) | steps | samples seen |"
    )
    out = [
        f"Toy transfer: a fresh Chinese encoder per objective, the same time budget "
        f"(~{setup['budget_s']:.0f} s, 1 thread, {setup['parallel_cells']} cells in parallel on "
        f"a 2-core CPU) and the same data for every Chinese row; mean ± sd over seeds "
        f"{setup['seeds']}. Held-out combinations only, {setup['eval']['seeds_per_combo']} "
        f"images each, DDIM {setup['eval']['steps']} steps, guidance "
        f"{setup['eval']['guidance']}.",
        "",
    ]
    for f in record.get("fractions") or list(record["tables"]):
        rows = record["tables"][f]
        out += [f"### {f} of the training triples", "", head, "|---" * 10 + "|"]
        for r in rows:
            ts = r.get("train_s")
            extra = (
                f"| {ts['mean']:.0f} | {r['steps']['mean']:.0f} | {r['samples_seen']['mean']:.0f} |"
                if ts and r["row"] != "untrained"
                else "| – | – | – |"
            )
            out.append(
                f"| {r['conditioning']} | {_fmt(r['colour'])} | {_fmt(r['shape'])} "
                f"| {_fmt(r['position'])} | {_fmt(r['all'])} | {_fmt(r['agreement'])} "
                f"| {_fmt(r['pixel_mse'], 4)} {extra}"
            )
        out.append("")
    spp = ", ".join(f"`{k}` {v:.3f}" for k, v in setup.get("s_per_step", {}).items())
    out += [
        "Reading the table: steps per objective = budget / seconds per step measured by a short "
        f"calibration run ({spp} s/step); train time is what each run measured. Agreement "
        "counts images whose three classified attributes equal those of the English image "
        "from the same initial noise; when the English row is perfect it equals all-three "
        "accuracy, and pixel MSE (images in [0, 1]) still separates the rows. The untrained "
        "row does not depend on the fraction (one evaluation per seed).",
        "",
    ]
    if record.get("note"):
        out += [record["note"], ""]
    return "\n".join(out)


if __name__ == "__main__":  # worker entry: python -m iap_rt.train.toy.transfer cell|calibrate SPEC
    mode, spec_file = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_file).read_text("utf-8"))
    import torch

    torch.set_num_threads(1)
    print(json.dumps(run_cell(spec) if mode == "cell" else _calibrate_one(spec)))
