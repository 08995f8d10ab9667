"""The toy trainers' training state (the base's and the plug-in fine-tune's): weights, their EMA,
AdamW moments, the torch RNG and the step count in one atomic safetensors file.
"""

from __future__ import annotations

import json
from pathlib import Path

from iap_rt.fileio import ensure_dir, write_json_atomic


def save_training_state(ckpt: Path, both, ema, opt, state: dict) -> None:
    """Weights of ``both`` (a ModuleDict: here unet + text [+ aux]; the plug-in fine-tune's
    unet alone), their EMA, AdamW moments, the torch RNG and ``state`` into
    ``ckpt/checkpoint.safetensors`` in one atomic write (``state`` as JSON in its metadata, so
    a kill can never pair new weights with an old step count); ``state.json`` beside it is a
    copy for people and tools."""
    import torch
    from safetensors.torch import save_file

    from iap_rt.fileio import atomic_path

    ensure_dir(ckpt)
    tensors = dict(both.state_dict())  # unet.* and text.*
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, p in enumerate(both.parameters()):
        st = opt.state.get(p)
        if st:
            tensors[f"opt.exp_avg.{i}"] = st["exp_avg"]
            tensors[f"opt.exp_avg_sq.{i}"] = st["exp_avg_sq"]
            tensors[f"opt.step.{i}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(ckpt / "checkpoint.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(state)})
    write_json_atomic(ckpt / "state.json", state)


def read_training_state(ckpt: Path) -> dict:
    """The ``state`` saved with the weights in ``ckpt`` (``state.json`` for checkpoints written
    before it travelled in the weights file's metadata)."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "checkpoint.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    if "state" in meta:
        return json.loads(meta["state"])
    return json.loads((ckpt / "state.json").read_text("utf-8"))


def load_training_state(ckpt: Path, both, ema, opt) -> dict:
    """Restore what :func:`save_training_state` wrote into ``both``, ``ema``, ``opt`` and the
    torch RNG; -> the saved ``state``."""
    import torch
    from safetensors.torch import load_file

    t = load_file(str(ckpt / "checkpoint.safetensors"))
    names = tuple(f"{m}." for m in both)  # unet, text (and aux with --text-aux)
    both.load_state_dict({k: v for k, v in t.items() if k.startswith(names)})
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    for i, p in enumerate(both.parameters()):
        if f"opt.exp_avg.{i}" in t:
            opt.state[p] = {
                "step": torch.tensor(float(t[f"opt.step.{i}"][0])),
                "exp_avg": t[f"opt.exp_avg.{i}"],
                "exp_avg_sq": t[f"opt.exp_avg_sq.{i}"],
            }
    torch.set_rng_state(t["rng.torch"])
    return read_training_state(ckpt)
