"""The transfer grid (``iap-rt toy transfer``): a fresh Chinese encoder per cell.

Cells: objective (``pivot``, ``full``, ``embed``, ``denoise``) x data fraction (1, 5, 10 %) x
seed, each with the same CPU-time budget; ``denoise`` also on 100 % of the triples with
:data:`LONG_FACTOR` times the budget (the paper's claim is pivot at 5-10 % >= denoise at 100 %);
the untrained encoder once per seed; the English base once.

1. per seed a character-vocabulary encoder is initialised (:func:`build_init_encoder`); every
   objective of that seed starts from it;
2. **equal CPU time**: each objective's CPU seconds per step are measured (one thread, the
   cache already built) from two runs of different length, so start-up cost cancels; a cell
   gets ``budget / (s/step)`` steps. Process CPU time, not wall time, because the machine is
   shared; every cell runs on one thread (``OMP_NUM_THREADS=1``), so CPU time is work;
3. a cell trains with ``iap-rt train`` (in-process), exports with ``iap-rt export --engines
   none`` (:func:`export_model`: UNet and VAE copied from a template export) and is evaluated through
   the torch-free runtime on every held-out combo; the English base is evaluated once through
   diffusers from the same numpy noise (agreement compares like with like);
4. cells are one-thread subprocesses (:func:`.workdir.run_workers`), each writes ``cells/<name>.json`` and
   a finished cell is never re-run, so an interrupted grid resumes; the long ``denoise`` runs
   keep :data:`CURVE_POINTS` checkpoints for the learning curves (:mod:`.curves`);
5. :func:`aggregate` writes ``toy_transfer.json`` (``results``: one object per objective,
   fraction and seed) and ``toy_transfer.md``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from iap_rt.errors import ArtifactNotFoundError, InputError
from iap_rt.fileio import write_json_atomic, write_text_atomic
from iap_rt.train.toy.report import aggregate, fraction_value
from iap_rt.train.toy.workdir import check_same_base, run_workers

OBJECTIVES = ("pivot", "full", "embed", "denoise")
# the old position-wise text distillation, at 10 % only: is the new `embed` better? (issue 14.5)
COMPARE_OBJECTIVE, COMPARE_FRACTION = "embed_pos", "10pct"
FRACTIONS = ("1pct", "5pct", "10pct")
LONG_FRACTION, LONG_OBJECTIVE, LONG_FACTOR = "100pct", "denoise", 5
CURVE_POINTS = 5  # checkpoints kept by the long runs
ZH_MAX_LENGTH = 40  # 2 x the English 20: the English token set can be matched exactly
LR = 1e-3
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # the WordPiece special tokens
MODULE = "iap_rt.train.toy.transfer"


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


def default_eval() -> dict:
    """Every held-out combo (24 one-object, 192 two-object), one image each (``max_combos``:
    that many of each kind instead, for tests)."""
    return {"seeds_per_combo": 1, "steps": 25, "guidance": 3.0, "scheduler": "ddim",
            "max_combos": None}  # fmt: skip


def eval_combos(ev: dict) -> list[tuple]:
    from iap_rt.train.toy.evaluate import select_combos

    return select_combos("heldout", "all", limit=ev.get("max_combos"))


def build_init_encoder(data: Path, base: Path, out: Path, seed: int) -> Path:
    """``out`` = vocab.txt + a fresh char-vocabulary BERT (:func:`encoder_config`, 40 positions)."""
    import torch
    from transformers import BertConfig

    from iap_rt.tokenizer import build_wordpiece_tokenizer
    from iap_rt.train.encoder import ChineseTextEncoder

    chars = json.loads((data / "meta.json").read_text("utf-8"))["zh_characters"]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "vocab.txt", "\n".join([*SPECIAL, *chars]) + "\n")
    tok = build_wordpiece_tokenizer(out / "vocab.txt")
    width = json.loads((base / "unet" / "config.json").read_text())["cross_attention_dim"]
    torch.manual_seed(seed)
    cfg = BertConfig(**encoder_config(len(SPECIAL) + len(chars), width, 2, ZH_MAX_LENGTH))
    ChineseTextEncoder(cfg, None, max_length=ZH_MAX_LENGTH).save(out, tokenizer=tok)
    return out


def export_model(base: Path, encoder: Path, out: Path, like: Path | None = None) -> None:
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


def train_run(spec: dict, out: Path, steps: int, data_file: Path, checkpoints: int = 0) -> dict:
    """``iap-rt train`` in-process for ``spec``; -> summary + process CPU seconds."""
    from iap_rt.train.config import TrainConfig
    from iap_rt.train.trainer import run

    work = Path(spec["work"])
    cfg = TrainConfig(
        base=spec["base"],
        encoder=str(init_dir(work, spec["seed"])),
        data=str(data_file),
        out=str(out),
        cache_dir=str(work / "cache"),
        objective=spec["objective"],
        resolution=32,
        max_steps=steps,
        batch_size=spec["batch"],
        lr=LR,
        warmup_steps=max(1, steps // 20),
        val_every=0,
        checkpoint_every=max(1, steps // checkpoints) if checkpoints else 0,
        # the last step is saved too: keep every periodic checkpoint besides it (with only
        # ``checkpoints`` kept, the first curve point was rotated out)
        keep_checkpoints=max(1, checkpoints + 1),
        seed=spec["seed"],
    )
    done = out / "cell_train.json"
    if done.is_file():  # trained before an interrupted export / evaluation
        return json.loads(done.read_text("utf-8"))
    if out.exists():  # an interrupted training run: start again, so its CPU time is whole
        import shutil

        shutil.rmtree(out)
    cpu0 = time.process_time()
    summary = run(cfg)
    summary.pop("data", None)
    summary |= {"train_cpu_s": time.process_time() - cpu0, "samples_seen": steps * cfg.batch_size}
    write_json_atomic(done, summary)
    return summary


def init_dir(work: Path, seed: int) -> Path:
    return work / f"init_s{seed}"


def cell_name(spec: dict) -> str:
    if spec["objective"] == "untrained":
        return f"s{spec['seed']}_untrained"
    return f"{spec['fraction']}_s{spec['seed']}_{spec['objective']}" + spec.get("tag", "")


def english_reference(base: Path, work: Path, ev: dict) -> dict:
    """Evaluate the English base once (``work/english.json`` + ``english.npz``: images and the
    checker's reading of each, for agreement)."""
    import numpy as np

    from iap_rt.train.toy.evaluate import dark_fraction, diffusers_generator, evaluate

    js, npz = work / "english.json", work / "english.npz"
    if js.is_file() and npz.is_file():
        return json.loads(js.read_text("utf-8"))
    gen = diffusers_generator(base, steps=ev["steps"], guidance=ev["guidance"], numpy_noise=True)
    res, img, _, preds = evaluate(gen, "en", eval_combos(ev), ev["seeds_per_combo"])
    work.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(npz, images=img, preds=np.array(json.dumps(preds)))
    record = res | {"agreement": 1.0, "agreement_two": 1.0, "pixel_mse": 0.0}
    record["dark"] = dark_fraction(img)
    write_json_atomic(js, record)
    return record


def evaluate_model(model: Path, work: Path, ev: dict) -> dict:
    """Held-out Chinese scores of an exported model + agreement with the English images."""
    import numpy as np

    from iap_rt.train.toy.evaluate import agreement, dark_fraction, evaluate, runtime_generator

    gen = runtime_generator(model, steps=ev["steps"], guidance=ev["guidance"])
    res, img, items, preds = evaluate(gen, "zh", eval_combos(ev), ev["seeds_per_combo"])
    en = np.load(work / "english.npz")
    en_preds = [_tuple(p) for p in json.loads(str(en["preds"]))]
    return res | agreement(items, en_preds, preds, en["images"], img) | {"dark": dark_fraction(img)}


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def run_cell(spec: dict) -> dict:
    """Train (unless ``untrained``), export and evaluate one cell; writes its result file."""
    work, base = Path(spec["work"]), Path(spec["base"])
    name = cell_name(spec)
    summary: dict = {}
    if spec["objective"] == "untrained":
        enc = init_dir(work, spec["seed"])
    else:
        run_dir = work / "runs" / name
        data_file = Path(spec["data"]) / f"train_{spec['fraction']}.jsonl"
        summary = train_run(spec, run_dir, spec["steps"], data_file, spec.get("checkpoints", 0))
        enc = run_dir / "chinese_encoder"
    model = work / "models" / name
    export_model(base, enc, model, like=work / "models" / "template")
    res = evaluate_model(model, work, spec["eval"])
    row = {
        "objective": spec["objective"],
        "fraction": spec["fraction"],
        "seed": spec["seed"],
        **res,
        "steps": spec.get("steps", 0),
        "budget_cpu_s": spec.get("budget_cpu_s", 0.0),
        "train_cpu_s": summary.get("train_cpu_s", 0.0),
        "train_s": summary.get("elapsed_s", 0.0),
        "samples_seen": summary.get("samples_seen", 0),
        "final_loss": summary.get("final_loss"),
    }
    write_json_atomic(work / "cells" / f"{name}.json", row)
    return row


def _calibrate_one(spec: dict) -> dict:
    """CPU seconds per step of one objective: runs of ``n1`` and ``n2`` steps, slope."""
    work = Path(spec["work"])
    data_file = Path(spec["data"]) / "train_10pct.jsonl"
    cpu = []
    for n in [2, *spec["lengths"]]:  # the 2-step run pays the imports and first-call costs
        out = work / "calibration" / f"{spec['objective']}_{n}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cpu.append(train_run(spec, out, n, data_file)["train_cpu_s"])
    (n1, n2), (c1, c2) = spec["lengths"], cpu[1:]
    slope = (c2 - c1) / (n2 - n1)
    # at short lengths on a busy machine the slope can come out <= 0 (noise larger than the
    # extra steps' cost): then the longer run's mean, an upper bound, is the estimate
    res = {"s_per_step": slope if slope > 0 else c2 / n2, "slope": slope, "cpu_s": cpu,
           "lengths": [n1, n2]}  # fmt: skip
    write_json_atomic(work / "calibration" / f"{spec['objective']}.json", res)
    return res


def calibrate(
    common: dict, jobs: int, log, lengths=(10, 40), objectives=(*OBJECTIVES, COMPARE_OBJECTIVE)
) -> dict[str, float]:
    """CPU seconds per step of ``objectives`` (cached in ``work/calibration.json``);
    ``jobs`` worker processes, or 0: in this process."""
    work = Path(common["work"])
    path = work / "calibration.json"
    if path.is_file():
        cached = json.loads(path.read_text("utf-8"))
        if set(objectives) <= set(cached):
            return cached
    tasks = [
        ("calibrate", f"calibrate_{o}", common | {"objective": o, "seed": 0, "lengths": lengths},
         work / "calibration" / f"{o}.json")
        for o in objectives
    ]  # fmt: skip
    if jobs > 0:
        run_workers(tasks, work, jobs, log, module=MODULE)
    else:  # in this process (tests)
        for _, _, spec, result in tasks:
            if not result.is_file():
                _calibrate_one(spec)
    out = {
        o: json.loads((work / "calibration" / f"{o}.json").read_text("utf-8"))["s_per_step"]
        for o in objectives
    }
    log("calibrated CPU s/step: " + ", ".join(f"{o} {v:.3f}" for o, v in out.items()))
    write_json_atomic(path, out)
    return out


def prepare(
    data: Path, base: Path, work: Path, seeds, batch: int, ev: dict, jobs: int, log,
    calib_lengths=(10, 40), objectives=(*OBJECTIVES, COMPARE_OBJECTIVE),
):  # fmt: skip
    """Init encoders, template export, shared cache, English reference, calibration."""
    work.mkdir(parents=True, exist_ok=True)
    check_same_base(work, base)
    for s in seeds:
        if not (init_dir(work, s) / "vocab.txt").is_file():
            build_init_encoder(data, base, init_dir(work, s), s)
    if not (work / "models" / "template" / "manifest.json").is_file():
        export_model(base, init_dir(work, seeds[0]), work / "models" / "template")
    log(f"english: {english_reference(base, work, ev)}")
    common = {"data": str(data), "base": str(base), "work": str(work), "batch": batch, "eval": ev}
    if not (work / "cache" / "ready").is_file():  # the whole dataset once, before any timing
        from iap_rt.train.config import TrainConfig
        from iap_rt.train.trainer import run

        cfg = TrainConfig(base=str(base), encoder=str(init_dir(work, seeds[0])),
                          data=str(data / "train_100pct.jsonl"), out=str(work / "cache_run"),
                          cache_dir=str(work / "cache"), resolution=32)  # fmt: skip
        run(cfg, cache_only=True)
        write_text_atomic(work / "cache" / "ready", "ok\n")
    return common, calibrate(common, jobs, log, list(calib_lengths), objectives)


def grid_specs(common: dict, spp: dict, seeds, fractions, budget_s: float) -> list[dict]:
    """Every cell's spec: untrained per seed, objectives x fractions x seeds, long denoise."""
    specs = [common | {"objective": "untrained", "fraction": "0pct", "seed": s} for s in seeds]
    for f in fractions:
        for s in seeds:
            for o in OBJECTIVES:
                steps = max(1, int(budget_s / spp[o]))
                specs.append(common | {"objective": o, "fraction": f, "seed": s, "steps": steps,
                                       "budget_cpu_s": budget_s})  # fmt: skip
    if COMPARE_FRACTION in fractions:
        for s in seeds:
            steps = max(1, int(budget_s / spp[COMPARE_OBJECTIVE]))
            specs.append(common | {"objective": COMPARE_OBJECTIVE, "fraction": COMPARE_FRACTION,
                                   "seed": s, "steps": steps, "budget_cpu_s": budget_s})  # fmt: skip
    long_budget = LONG_FACTOR * budget_s
    for s in seeds:
        steps = max(1, int(long_budget / spp[LONG_OBJECTIVE]))
        specs.append(common | {"objective": LONG_OBJECTIVE, "fraction": LONG_FRACTION, "seed": s,
                               "steps": steps, "budget_cpu_s": long_budget,
                               "checkpoints": CURVE_POINTS})  # fmt: skip
    return specs


def longest_first(specs: list[dict]) -> list[dict]:
    """Run order: the largest CPU budget first, then the largest data fraction (stable).

    Longest-processing-time-first keeps both workers busy to the end instead of leaving a
    5x-budget run alone at the tail, and the cells the paper's claim compares (``denoise`` at
    100 %, then the 10 % and 5 % cells) finish first if a session is cut short."""
    return sorted(
        specs, key=lambda s: (-s.get("budget_cpu_s", 0.0), -fraction_value(s["fraction"]))
    )


def run_grid(
    data_dir,
    base,
    work,
    results="bench/results",
    fractions: tuple[str, ...] = FRACTIONS,
    seeds: tuple[int, ...] = (0, 1, 2),
    budget_s: float = 180.0,
    batch: int = 64,
    jobs: int = 2,
    ev: dict | None = None,
    log=print,
) -> dict:
    """Run every cell (resumable) and write the aggregated results."""
    data, base, work = Path(data_dir), Path(base), Path(work)
    ev = ev or default_eval()
    for f in (*fractions, LONG_FRACTION):
        if not (data / f"train_{f}.jsonl").is_file():
            raise ArtifactNotFoundError(
                f"{data / f'train_{f}.jsonl'} is missing", fix=f"iap-rt toy data --out {data}"
            )
    if budget_s <= 0:
        raise InputError(f"--budget-s must be > 0, got {budget_s}")
    work.mkdir(parents=True, exist_ok=True)
    common, spp = prepare(data, base, work, seeds, batch, ev, jobs, log)
    specs = longest_first(grid_specs(common, spp, seeds, fractions, budget_s))
    tasks = [("cell", cell_name(s), s, work / "cells" / f"{cell_name(s)}.json") for s in specs]
    run_workers(tasks, work, jobs, log, module=MODULE)
    setup = {
        "budget_cpu_s": budget_s,
        "long": {"objective": LONG_OBJECTIVE, "fraction": LONG_FRACTION, "factor": LONG_FACTOR},
        "s_per_step_cpu": spp,
        "batch_size": batch,
        "lr": LR,
        "seeds": list(seeds),
        "fractions": list(fractions),
        "zh_max_length": ZH_MAX_LENGTH,
        "eval": ev | {"combos": "heldout", "noise": "numpy initial_noise"},
        "base": str(base),
        "threads_per_cell": 1,
        "parallel_cells": jobs,
    }
    return aggregate(work, results, setup)


if __name__ == "__main__":  # worker: python -m iap_rt.train.toy.transfer cell|calibrate SPEC
    mode, spec_file = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_file).read_text("utf-8"))
    import torch

    torch.set_num_threads(1)
    os.environ["IAP_RT_THREADS"] = "1"  # ONNX Runtime too: one thread per cell
    print(json.dumps(run_cell(spec) if mode == "cell" else _calibrate_one(spec)))
