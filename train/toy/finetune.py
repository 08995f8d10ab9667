"""Plug-in compatibility (``iap-rt toy finetune`` / ``toy plugin``): a restyled UNet, old encoders.

:func:`finetune_unet` fine-tunes the English base's UNet alone (text encoder, tokenizer, VAE
frozen) on English captions of images in another style (``iap-rt toy data --style outline``:
coloured outlines on a dark background) and writes a complete diffusers pipeline directory
whose only new part is ``unet/``, the way community fine-tunes of SD are shipped.

:func:`plugin_eval` then takes Chinese encoders trained against the *original* base (the grid's
cells) and, without retraining, exports each with the fine-tuned UNet (``iap-rt export --base
BASE --unet FINETUNED``, the product path) and evaluates it on the
held-out prompts against the fine-tuned English base from the same noise: binding, agreement
with English, and whether the new style came through (``dark``: fraction of images with a dark
background).

Training loop: plain v-prediction MSE as in :mod:`iap_rt.train.toy.base`, AdamW, a CPU-time
budget (one thread), and the base's finish: the learning rate cools linearly to 0 over the last
``cooldown`` of the budget and the written UNet is the EMA of the weights. Without them (the
first plug-in run) the fine-tuned UNet drew grainy outlines whose shapes the checker could not
read (English on it: objects 0.21). Checkpoints in ``OUT/checkpoint`` (the base's format) make
it resumable.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from iap_rt.errors import InputError
from iap_rt.fileio import ensure_dir, write_json_atomic


def finetune_unet(
    base: str | os.PathLike,
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    minutes: float = 10.0,
    batch_size: int = 32,
    lr: float = 2e-4,
    seed: int = 0,
    caption_dropout: float = 0.1,
    ema_decay: float = 0.995,
    cooldown: float = 0.3,
    checkpoint_minutes: float = 3.0,
    max_steps: int | None = None,
    log_every: int = 50,
    progress=print,
) -> Path:
    """Fine-tune ``base``'s UNet on ``data_dir`` (English captions) for ``minutes`` CPU minutes.

    Resumable: every ``checkpoint_minutes`` (wall clock) and at the end, the UNet, its EMA,
    the AdamW moments, the RNG and the CPU time spent go to ``out/checkpoint`` (the base's
    format, :func:`~iap_rt.train.toy.train_state.save_training_state`); a later call with the same
    base, data and settings continues from there, and the budget counts across resumes.
    ``max_steps`` stops earlier (tests)."""
    import torch
    from diffusers import DDPMScheduler

    from iap_rt.train.ema import EMA
    from iap_rt.train.toy.base import load_training_data
    from iap_rt.train.toy.base_model import load_base, tokenize
    from iap_rt.train.toy.train_state import (
        load_training_state,
        read_training_state,
        save_training_state,
    )
    from iap_rt.train.toy.workdir import base_fingerprint

    base, out = Path(base), Path(out)
    ckpt = out / "checkpoint"
    run = {  # what identifies this fine-tune: a checkpoint with other values is refused
        "base_sha256": base_fingerprint(base), "data": str(Path(data_dir).resolve()),
        "minutes": minutes, "batch_size": batch_size, "lr": lr, "seed": seed,
        "caption_dropout": caption_dropout, "ema_decay": ema_decay, "cooldown": cooldown,
    }  # fmt: skip
    resuming = (ckpt / "checkpoint.safetensors").is_file()
    if resuming:  # before the slow part: refuse early
        saved = read_training_state(ckpt).get("run", {})
        diff = sorted(k for k in run if saved.get(k) != run[k])
        if diff:
            raise InputError(
                f"{ckpt} holds a fine-tune with other settings ("
                + "; ".join(f"{k}: {saved.get(k)!r} there, {run[k]!r} now" for k in diff)
                + ")",
                fix="resume with the same --base, --data and --minutes, or choose a new --out.",
            )
    torch.manual_seed(seed)
    tok, text, unet, vae, sched_cfg = load_base(base)
    x, captions, _ = load_training_data(data_dir)
    with torch.no_grad():
        lat = (
            torch.cat(
                [vae.encode(x[i : i + 1024]).latent_dist.mode() for i in range(0, len(x), 1024)]
            )
            * vae.config.scaling_factor
        )  # (N, 3, 32, 32)
        ids = tokenize(tok, captions)  # (N, S)
        empty = tokenize(tok, [""])  # (1, S)
    noise_sched = DDPMScheduler.from_config(sched_cfg)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    held = torch.nn.ModuleDict({"unet": unet})  # the checkpoint's module names
    ema = EMA(held, ema_decay)
    state = {"step": 0, "seconds": 0.0, "run": run}
    if resuming:
        state = load_training_state(ckpt, held, ema, opt)
        progress(f"resumed at step {state['step']} ({state['seconds'] / 60:.1f} CPU min trained)")
    gen = torch.Generator().manual_seed(seed * 1000 + state["step"])
    budget = minutes * 60.0
    cpu0, t_ckpt, running = time.process_time() - state["seconds"], time.time(), None
    while (done := (time.process_time() - cpu0) / budget) < 1.0:
        step = state["step"]
        if max_steps is not None:
            if step >= max_steps:
                break
            done = max(done, step / max_steps)
        for group in opt.param_groups:  # constant, then linear to 0 over the last `cooldown`
            group["lr"] = lr * min(1.0, (1.0 - done) / cooldown) if cooldown > 0 else lr
        idx = torch.randint(0, len(lat), (batch_size,), generator=gen)
        tids = ids[idx].clone()
        tids[torch.rand(batch_size, generator=gen) < caption_dropout] = empty[0]
        with torch.no_grad():
            ctx = text(tids).last_hidden_state  # (B, S, D)
        z0 = lat[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        pred = unet(noise_sched.add_noise(z0, noise, t), t, ctx).sample
        target = noise_sched.get_velocity(z0, noise, t)
        loss = (pred - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(held, step)
        state["step"] = step = step + 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if time.time() - t_ckpt > checkpoint_minutes * 60:
            state["seconds"] = time.process_time() - cpu0
            save_training_state(ckpt, held, ema, opt, state)
            t_ckpt = time.time()
        if step % log_every == 0:
            progress(f"finetune step {step} loss {running:.4f} "
                     f"CPU {(time.process_time() - cpu0) / 60:.1f}/{minutes:g} min")  # fmt: skip
    state["seconds"] = cpu_s = time.process_time() - cpu0
    save_training_state(ckpt, held, ema, opt, state)
    ensure_dir(out)
    for part in base.iterdir():  # the base's pipeline with the new unet/; out/checkpoint stays
        if part.name in ("unet", "checkpoint"):
            continue
        dest = out / part.name
        if dest.is_dir():
            shutil.rmtree(dest)
        (shutil.copytree if part.is_dir() else shutil.copy2)(part, dest)
    unet.eval()
    ema.copy_to(held)
    if (out / "unet").exists():
        shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet", safe_serialization=True)
    write_json_atomic(out / "toy_finetune.json", {
        "from": str(base.resolve()), **run, "steps": state["step"],
        "train_cpu_s": cpu_s, "samples_seen": state["step"] * batch_size,
        "trained": "unet only (text encoder, tokenizer, VAE frozen)",
    })  # fmt: skip
    progress(f"fine-tuned UNet written to {out} ({state['step']} steps, {cpu_s / 60:.1f} CPU min)")
    return out


def plugin_eval(
    finetuned: str | os.PathLike,
    work: str | os.PathLike,
    out: str | os.PathLike,
    fraction: str = "10pct",
    seeds: tuple[int, ...] = (0, 1, 2),
    objectives: tuple[str, ...] = ("pivot", "full", "embed", "denoise"),
    ev: dict | None = None,
    source: str = "grid",
    log=print,
) -> dict:
    """Evaluate Chinese encoders trained against the original base with the fine-tuned UNet;
    English on the fine-tuned base is the reference. Resumable per cell.

    ``source`` picks the encoders: ``grid`` the grid's cells (``work/runs/<fraction>_s<seed>_
    <objective>``, the grid's budget), ``curves`` the learning curves' long runs
    (``work/curve_runs/...``, seed 0 whatever ``seeds`` says, :data:`~.transfer.LONG_FACTOR` x
    the budget)."""
    import numpy as np

    from iap_rt.train.toy import transfer
    from iap_rt.train.toy.evaluate import dark_fraction, diffusers_generator, evaluate
    from iap_rt.train.toy.report import base_used

    finetuned, work = Path(finetuned), Path(work)
    if source not in SOURCES:
        raise InputError(f"source must be one of {tuple(SOURCES)}, got {source!r}")
    runs, cells, own_seeds = SOURCES[source]
    seeds = own_seeds or seeds
    record_ft = json.loads((finetuned / "toy_finetune.json").read_text("utf-8"))
    base = Path(record_ft["from"])
    fingerprint = transfer.check_same_base(work, base)  # the encoders were trained against it
    if record_ft.get("base_sha256") != fingerprint:  # retrained since the fine-tune
        raise InputError(f"{finetuned} was not fine-tuned from today's {base} (its record has "
                         f"another or no base fingerprint); fine-tune it again")  # fmt: skip
    pw = ensure_dir(work / "plugin")
    _same_finetune(pw, record_ft)
    ev = ev or transfer.default_eval()
    if not (pw / "english.json").is_file():
        gen = diffusers_generator(finetuned, steps=ev["steps"], guidance=ev["guidance"],
                                  numpy_noise=True)  # fmt: skip
        res, img, _, preds = evaluate(gen, "en", transfer.eval_combos(ev), ev["seeds_per_combo"])
        np.savez_compressed(pw / "english.npz", images=img, preds=np.array(json.dumps(preds)))
        write_json_atomic(pw / "english.json", res | {"dark": dark_fraction(img)})
    rows = [{"objective": "english", "seed": 0}
            | json.loads((pw / "english.json").read_text("utf-8"))]  # fmt: skip
    for obj in objectives:
        for s in seeds:
            name = f"{fraction}_s{s}_{obj}"
            res_path = pw / cells / f"{name}.json"
            if not res_path.is_file():
                model, enc = pw / "models" / name, work / runs / name / "chinese_encoder"
                template = pw / "models" / "template"
                if not (template / "manifest.json").is_file():  # fine-tuned UNet + VAE once
                    export_plugin(base, finetuned, enc, template)
                export_plugin(base, finetuned, enc, model, like=template)
                res = transfer.evaluate_model(model, pw, ev)
                orig = _on_base(work, source, name)  # the same encoder, the original UNet
                if orig is not None:
                    res |= {f"{k}_on_base": orig[k] for k in ("binding", "agreement")}
                write_json_atomic(res_path, res | {"objective": obj, "seed": s})
                shutil.rmtree(model)
            rows.append(json.loads(res_path.read_text("utf-8")))
            log(f"plugin {name}: binding {rows[-1]['binding']:.3f}")
    record = {"base_used": base_used(work), "finetuned": record_ft, "source": source,
              "fraction": fraction, "eval": ev, "results": rows}  # fmt: skip
    write_json_atomic(Path(out), record)
    return record


# source -> (run directories under the work dir, result directory under work/plugin, the seeds
# it has: None = the grid's --seeds; the learning curves train seed 0 only)
SOURCES = {"grid": ("runs", "cells", None), "curves": ("curve_runs", "cells_curves", (0,))}


def _same_finetune(pw: Path, record: dict) -> None:
    """The plug-in cache (English on the fine-tuned UNet, finished cells) belongs to one
    fine-tune: refuse to mix results from another."""
    own = pw / "finetuned.json"
    from iap_rt.train.toy.workdir import pin_record

    msg = (f"{pw} holds plug-in results for another fine-tuned UNet ({own}); move or delete "
           f"{pw} to evaluate this one")  # fmt: skip
    pin_record(own, record, key=None, refuse=msg, unpinned=pw / "english.json", legacy=msg)


def _on_base(work: Path, source: str, name: str) -> dict | None:
    """The encoder's scores with the original UNet: its grid cell, or its last curve point."""
    if source == "grid":
        path = work / "cells" / f"{name}.json"
        return json.loads(path.read_text("utf-8")) if path.is_file() else None
    points = sorted((work / "curves").glob(f"{name}_[0-9]*.json"))
    return json.loads(points[-1].read_text("utf-8")) if points else None


def export_plugin(base: Path, finetuned: Path, encoder: Path, out: Path, like=None) -> Path:
    """``iap-rt export --base BASE --unet FINETUNED --encoder ENCODER --engines none`` (the
    product path: the original base, its UNet swapped for the fine-tuned one)."""
    import dataclasses

    from iap_rt.export.config import resolve_export_config
    from iap_rt.export.stage import run_export

    if like is not None and not out.exists():
        shutil.copytree(like, out)
    cfg = resolve_export_config(None, base=str(base), encoder=str(encoder), out=str(out),
                                unet=str(finetuned))  # fmt: skip
    return run_export(dataclasses.replace(cfg, engines="none"), echo=lambda m: None)
