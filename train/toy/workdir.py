"""Pieces of the transfer experiments that world v2 (:mod:`iap_rt.train.toy2.transfer`) uses:
a small BERT config for a fresh Chinese encoder, an in-process ``iap-rt export``, and the
worker pool that runs cells as one-thread subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from iap_rt.fileio import write_json_atomic

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


def _run_workers(
    tasks: list[tuple[str, str, dict, Path]],
    work: Path,
    jobs: int,
    log,
    module: str,
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
