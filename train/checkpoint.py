"""Training checkpoints: atomic safetensors directories, the last K kept, ``--resume``.

::

    OUT/checkpoints/step-00001000/
        encoder.safetensors    ChineseTextEncoder state (encoder.* and projection.*)
        ema.safetensors        EMA of the encoder weights (when ema_decay > 0)
        optimizer.safetensors  AdamW state tensors; param groups in the metadata
        rng.safetensors        torch CPU/CUDA and numpy RNG states
        state.json             step, LR scheduler, python RNG, resolved config, processes
                               and global batch

A checkpoint is written into a hidden temp directory and renamed into place when complete,
so a kill at any moment leaves either the whole checkpoint or none.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from iap_rt.errors import ArtifactMismatchError, ArtifactNotFoundError, ConfigError
from iap_rt.fileio import ensure_dir, write_json_atomic
from iap_rt.train.config import TrainConfig, resume_conflicts

FORMAT = "iap-rt-train-checkpoint"
VERSION = 1
DIRNAME = "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out``, oldest first."""
    root = out / DIRNAME
    found = []
    for p in root.glob("step-*") if root.is_dir() else ():
        if p.is_dir() and (p / "state.json").is_file() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def prepare_resume(out: Path, cfg: TrainConfig, resume: bool, processes: int = 1) -> Path | None:
    """The checkpoint to resume from (or None); refuse anything that would overwrite a run,
    and a checkpoint whose config or global batch (``batch_size x grad_accum x processes``:
    how it is split may change) differs from this run's."""
    ckpts = list_checkpoints(out)
    if not resume:
        if ckpts or (out / "chinese_encoder").exists():
            raise ConfigError(
                f"{out} already holds a training run (checkpoints/ or chinese_encoder/)",
                fix="pass --resume to continue it, or choose a new --out directory.",
            )
        return None
    if not ckpts:
        raise ArtifactNotFoundError(
            f"--resume: no checkpoint in {out / DIRNAME}",
            fix="run without --resume to start a new run.",
        )
    path = ckpts[-1][1]
    state = json.loads((path / "state.json").read_text("utf-8"))
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ArtifactMismatchError(f"{path} is not an iap-rt v{VERSION} training checkpoint")
    conflicts = resume_conflicts(state["config"], cfg)
    saved = state.get("global_batch") or (
        state["config"]["batch_size"] * state["config"]["grad_accum"] * state.get("processes", 1)
    )
    now = cfg.batch_size * cfg.grad_accum * processes
    if saved != now:
        was = state["config"]["batch_size"], state["config"]["grad_accum"]
        conflicts.append(
            f"global batch: checkpoint {saved} (batch_size {was[0]} x grad_accum {was[1]} x "
            f"{state.get('processes', 1)} processes), now {now} (batch_size {cfg.batch_size} x "
            f"grad_accum {cfg.grad_accum} x {processes} processes)"
        )
    if conflicts:
        raise ArtifactMismatchError(
            f"--resume: the checkpoint {path.name} was made with a different config: "
            + "; ".join(conflicts),
            fix="resume with the checkpoint's settings (any split of the same global batch "
            "over --batch-size, --grad-accum and processes), or start a new run in a new --out.",
        )
    return path


def save_checkpoint(
    out: Path,
    step: int,
    keep: int,
    encoder: dict,
    optimizer: dict,
    state: dict,
    ema: dict | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep``."""
    root = ensure_dir(out / DIRNAME)
    for stale in root.glob(".step-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        rng_tensors, rng_meta = _rng_state()
        files = {
            "encoder.safetensors": (encoder, None),
            "optimizer.safetensors": (opt_tensors, opt_meta),
            "rng.safetensors": (rng_tensors, None),
        }
        if ema is not None:
            files["ema.safetensors"] = (ema, None)
        for name, (tensors, meta) in files.items():
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            save_file(tensors, str(tmp / name), metadata=meta)
            _fsync(tmp / name)
        full = {"format": FORMAT, "version": VERSION, "step": step, "rng": rng_meta, **state}
        write_json_atomic(tmp / "state.json", full)
        if final.exists():  # the same step again after a resume: identical content
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """-> {step, encoder, optimizer, ema (or None), state}; restores the RNG states."""
    state = json.loads((path / "state.json").read_text("utf-8"))
    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        meta = f.metadata()
    optimizer = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta)
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    ema = path / "ema.safetensors"
    return {
        "step": int(state["step"]),
        "encoder": load_file(str(path / "encoder.safetensors")),
        "optimizer": optimizer,
        "ema": load_file(str(ema)) if ema.is_file() else None,
        "state": state,
    }


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in json.loads(meta["scalars"]).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = json.loads(meta["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, pstate, pgauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    meta["python"] = [version, list(pstate), pgauss]
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    version, pstate, pgauss = meta["python"]
    random.setstate((version, tuple(pstate), pgauss))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
