"""The toy transfer table: train a fresh Chinese encoder with every objective, compare.

:func:`run_table` for one data fraction and seed:

1. builds a character-vocabulary WordPiece tokenizer (``meta.json``'s ``zh_characters``) and a
   freshly initialised BERT-style encoder of the base's cross-attention width, saved as a
   ``chinese_encoder/`` directory (``init/``); every objective starts from these weights;
2. trains ``pivot``, ``full``, ``embed`` and ``denoise`` with the same steps, batch, lr and data
   (same samples seen; wall time differs and is reported);
3. exports each encoder (and the untrained one) with ``iap-rt export --engines none``;
4. evaluates every Chinese model on the held-out combinations through the torch-free runtime
   and the English base through diffusers, all from the same numpy initial noise
   (:func:`iap_rt.pipeline.initial_noise`), so agreement-with-English compares like with like;
5. writes ``<results>/toy_transfer_<frac>.json`` and ``.md``.

Torch and the training/export stages are imported inside the functions only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from iap_rt.fileio import write_json_atomic, write_text_atomic

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
    from iap_rt.export.modeldir import run_export

    if like is not None and not out.exists():
        shutil.copytree(like, out)
    cfg = resolve_export_config(None, base=str(base), encoder=str(encoder), out=str(out))
    run_export(dataclasses.replace(cfg, engines="none"), echo=lambda m: None)


def run_table(
    data_dir: str | Path,
    base: str | Path,
    work: str | Path,
    results: str | Path = "bench/results",
    fraction: str = "10pct",
    seed: int = 0,
    steps: int = 300,
    batch: int = 64,
    eval_seeds: int = 4,
    sample_steps: int = 25,
    guidance: float = 3.0,
    objectives: tuple[str, ...] = OBJECTIVES,
    note: str = "",
    log=print,
) -> dict:
    """Train, export and evaluate every row of the table; write JSON + Markdown; -> the record."""
    from iap_rt.toy.checker import Checker
    from iap_rt.toy.evaluate import agreement, diffusers_generator, evaluate, runtime_generator

    data_dir, base, work, results = Path(data_dir), Path(base), Path(work), Path(results)
    init = build_init_encoder(data_dir, base, work / "init", seed)
    checker = Checker()
    ev = dict(seeds_per_combo=eval_seeds, checker=checker)
    en_gen = diffusers_generator(base, steps=sample_steps, guidance=guidance, numpy_noise=True)
    en_res, en_img, _ = evaluate(en_gen, lang="en", **ev)
    rows = [{"conditioning": "English prompts, base model (upper bound)", **en_res}]
    rows[0] |= {"agreement": 1.0, "pixel_mse": 0.0}
    log(f"english: {en_res}")
    encoders = [("untrained encoder", init, {})]
    for obj in objectives:
        run_dir = work / f"{fraction}_s{seed}_{obj}"
        log(f"training {obj} ...")
        summary = train_objective(
            obj, base, init, data_dir / f"train_{fraction}.jsonl", run_dir, steps, batch, seed
        )
        log(f"{obj}: {summary}")
        encoders.append(
            (
                f"IAP `{obj}`" if obj in ("pivot", "full") else f"`{obj}` baseline",
                run_dir / "chinese_encoder",
                summary,
            )
        )
    first = None
    for name, enc, summary in encoders:
        model = work / f"model_{enc.parent.name if summary else f'{fraction}_s{seed}_init'}"
        export(base, enc, model, like=first)
        first = first or model
        gen = runtime_generator(model, steps=sample_steps, guidance=guidance)
        res, img, _ = evaluate(gen, lang="zh", **ev)
        res |= agreement(img, en_img, checker)
        row = {"conditioning": f"Chinese, {name}", **res, "model": str(model)}
        row |= {
            "train_s": summary.get("elapsed_s", 0.0),
            "samples_seen": summary.get("samples_seen", 0),
        }
        row |= {"final_loss": summary.get("final_loss")}
        rows.append(row)
        log(f"{name}: {row}")
    record = {
        "fraction": fraction,
        "seed": seed,
        "train": {
            "steps": steps,
            "batch_size": batch,
            "lr": 1e-3,
            "data": f"train_{fraction}.jsonl",
        },
        "eval": {
            "combos": "heldout",
            "seeds_per_combo": eval_seeds,
            "steps": sample_steps,
            "guidance": guidance,
            "scheduler": "ddim",
            "noise": "numpy initial_noise",
        },
        "base": str(base),
        "rows": rows,
        "note": note,
    }
    results.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results / f"toy_transfer_{fraction}.json", record)
    write_text_atomic(results / f"toy_transfer_{fraction}.md", markdown(record))
    return record


def markdown(record: dict) -> str:
    """The table as Markdown (one seed: no spread yet)."""
    head = (
        "| conditioning | colour | shape | position | all three | agreement w/ English "
        "| pixel MSE | train time (s) | samples seen |"
    )
    lines = [
        f"Toy transfer, {record['fraction']} of the triples, seed {record['seed']}, "
        f"{record['train']['steps']} steps × batch {record['train']['batch_size']}; held-out "
        f"combinations, n = {record['rows'][0]['n']} images per row.",
        "",
        head,
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['conditioning']} | {r['colour']:.3f} | {r['shape']:.3f} | {r['position']:.3f} "
            f"| {r['all']:.3f} | {r['agreement']:.3f} | {r['pixel_mse']:.4f} "
            f"| {r.get('train_s', 0):.0f} | {r.get('samples_seen', 0)} |"
        )
    if record.get("note"):
        lines += ["", record["note"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m iap_rt.toy.transfer DATA BASE WORK [STEPS [EVAL_SEEDS]]
    a = sys.argv[1:]
    t0 = time.time()
    steps, seeds = (int(a[3]) if len(a) > 3 else 300), (int(a[4]) if len(a) > 4 else 4)
    run_table(a[0], a[1], a[2], steps=steps, eval_seeds=seeds)
    print(f"done in {time.time() - t0:.0f} s")
