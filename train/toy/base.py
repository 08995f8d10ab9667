"""Training the toy English base (``iap-rt toy base``): a miniature Stable Diffusion from scratch.

What it trains and writes is :mod:`iap_rt.train.toy.base_model`'s diffusers directory. The
recipe: plain v-prediction MSE (see ``BaseConfig.min_snr_gamma``) in the pixel space of the
fixed VAE, 10 % caption dropout (to ""), AdamW with warm-up and a linear cool-down over the
last ``lr_decay_fraction`` of the budget, EMA of UNet and text encoder (the shipped weights),
and the auxiliary scene-from-text loss (``extra["text_aux_weight"]``, :func:`scene_loss`).

The budget (``minutes``) is the process's CPU time divided by its threads and counts across
resumes; a checkpoint (:mod:`iap_rt.train.toy.train_state`) is written every few minutes to
``OUT/checkpoint``, and training resumes from there, so a run can be stopped, looked at and
continued.

The pieces, in the order a run uses them: :func:`load_training_data`, :func:`pixel_latents`,
:func:`build_networks`, :func:`loss_weights`, :func:`learning_rate` + :func:`train_step` in the
loop of :func:`train_base`, then :func:`write_pipeline`.

torch / diffusers / transformers are imported inside functions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from iap_rt.errors import ArtifactNotFoundError, InputError
from iap_rt.fileio import ensure_dir, write_json_atomic
from iap_rt.train.toy import captions, data, scenes
from iap_rt.train.toy.base_model import (
    MODEL_INDEX,
    BaseConfig,
    load_tokenizer,
    scheduler_config,
    text_config,
    tokenize,
    unet_config,
    write_word_tokenizer,
)
from iap_rt.train.toy.train_state import load_training_state, save_training_state


def load_training_data(data_dir: str | os.PathLike, split: str = "train"):
    """(images as float (N, 3, 32, 32) in [-1, 1], English captions, rows) of ``split``."""
    import torch

    data_dir = Path(data_dir)
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise ArtifactNotFoundError(
            f"{path} is missing: {data_dir} is not a toy dataset",
            fix=f"iap-rt toy data --out {data_dir}",
        )
    rows = data.read_jsonl(path)
    if not rows:
        raise InputError(f"{path} has no rows", fix=f"iap-rt toy data --out {data_dir}")
    imgs = data.load_images(path, rows)  # (N, H, W, 3) uint8
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [r["en"] for r in rows], rows


def pixel_latents(x):
    """(the fixed pixel VAE standardising with ``x``'s per-channel statistics, the scaled
    latents of ``x`` (N, 3, 32, 32), its round-trip error on the first 256 images)."""
    import torch

    from iap_rt.train.toy.vae import build_pixel_vae, roundtrip_error

    mean = tuple(float(v) for v in x.mean((0, 2, 3)))
    std = tuple(float(v) for v in x.std((0, 2, 3)))
    vae = build_pixel_vae(mean, std)
    err = roundtrip_error(vae, x[:256])
    with torch.no_grad():
        lat = torch.cat(
            [vae.encode(x[i : i + 1024]).latent_dist.mode() for i in range(0, len(x), 1024)]
        )
    return vae, lat * vae.config.scaling_factor, err  # (N, 3, 32, 32)


def scene_labels(rows: list[dict]):
    """The auxiliary text loss's targets (``--text-aux``): per row the layout (one of
    :data:`scenes.LAYOUTS`), then colour and shape of the object in each slot (slot 0 = the
    left / top one; -1 where a one-object scene has no second slot). -> ``(labels (N, 5)
    int64, classes per head)``."""
    import torch

    nc, ns = len(scenes.COLOURS), len(scenes.SHAPES)
    out = []
    for row in rows:
        combo = scenes.combo_from_json(row)
        objs = [(scenes.COLOURS.index(c), scenes.SHAPES.index(sh)) for c, sh in combo[1:]]
        objs += [(-1, -1)] * (2 - len(objs))
        out.append([scenes.LAYOUTS.index(combo[0]), *objs[0], *objs[1]])
    return torch.tensor(out, dtype=torch.int64), (len(scenes.LAYOUTS), nc, ns, nc, ns)


def scene_loss(logits, labels, classes: tuple[int, ...]):
    """Mean cross entropy over the labelled (label >= 0) entries of every head; ``logits``
    ``(B, sum(classes))`` split per head, ``labels`` ``(B, len(classes))``."""
    import torch
    import torch.nn.functional as F

    total, count = logits.new_zeros(()), 0
    for h, part in enumerate(torch.split(logits, list(classes), dim=1)):
        keep = labels[:, h] >= 0
        if keep.any():
            total = total + F.cross_entropy(part[keep], labels[keep, h], reduction="sum")
            count += int(keep.sum())
    return total / max(1, count)


@dataclass
class Networks:
    """What training updates: ``both`` (a ModuleDict: ``unet``, ``text`` and, with the auxiliary
    loss, ``aux``; one EMA and one checkpoint for all), its parameters, optimiser and EMA, and
    the auxiliary loss's weight and targets."""

    both: Any
    params: list
    opt: Any
    ema: Any
    aux_weight: float = 0.0
    labels: Any = None  # (N, 5) int64 scene labels (:func:`scene_labels`), with the aux loss
    classes: tuple[int, ...] = ()


def build_networks(cfg: BaseConfig, tok, rows: list[dict]) -> Networks:
    """Fresh UNet and CLIP text encoder (seeded with ``cfg.seed``), and the auxiliary head: a
    linear layer on the text encoder's pooled (EOS) state that predicts the scene. The head is
    training-only (kept in the checkpoint, not in the pipeline directory): it stands in for the
    image-text pretraining that SD's CLIP encoder had before SD was trained."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from iap_rt.train.ema import EMA

    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(**unet_config(cfg))
    text = CLIPTextModel(
        CLIPTextConfig(**text_config(cfg, len(tok.get_vocab()), tok.bos_token_id, tok.eos_token_id))
    )
    unet.train()
    text.train()
    modules = {"unet": unet, "text": text}
    aux_weight = float(cfg.extra.get("text_aux_weight", 0.0))
    labels, classes = None, ()
    if aux_weight > 0:
        labels, classes = scene_labels(rows)  # (N, H), per-head class counts
        modules["aux"] = torch.nn.Linear(cfg.text_width, sum(classes))
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    both = torch.nn.ModuleDict(modules)
    return Networks(both, params, opt, EMA(both, cfg.ema_decay), aux_weight, labels, classes)


def loss_weights(cfg: BaseConfig, noise_sched):
    """Per-timestep weight of the diffusion loss, (T,): ones (plain v-MSE) or min-SNR."""
    import torch

    alphas_cumprod = noise_sched.alphas_cumprod.float()  # (T,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if cfg.min_snr_gamma > 0:
        denom = snr + 1 if cfg.prediction_type == "v_prediction" else snr
        return torch.clamp(snr, max=cfg.min_snr_gamma) / denom
    return torch.ones_like(snr)


def learning_rate(cfg: BaseConfig, step: int, done: float) -> float:
    """The rate at ``step`` with fraction ``done`` of the run behind: linear warm-up over
    ``warmup_steps``, constant, then (``lr_decay_fraction`` > 0) linear decay to 0 at the end."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.lr_decay_fraction > 0:
        lr *= min(1.0, max(0.0, (1.0 - done) / cfg.lr_decay_fraction))
    return lr


@dataclass
class Batches:
    """The training set as the step draws from it."""

    latents: Any  # (N, 3, 32, 32), scaled
    ids: Any  # (N, S) English token ids
    empty_ids: Any  # (S,) the ids of "" (caption dropout)


def train_step(cfg: BaseConfig, nets: Networks, batches: Batches, noise_sched, weights, gen):
    """One optimiser step on a batch drawn with ``gen``; -> (loss, auxiliary loss or None)."""
    import torch

    idx = torch.randint(0, len(batches.latents), (cfg.batch_size,), generator=gen)
    z0 = batches.latents[idx]  # (B, 3, 32, 32)
    tids = batches.ids[idx].clone()  # (B, S)
    drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
    tids[drop] = batches.empty_ids
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)
    zt = noise_sched.add_noise(z0, noise, t)
    enc = nets.both["text"](tids)
    pred = nets.both["unet"](zt, t, enc.last_hidden_state).sample  # context (B, S, D)
    if cfg.prediction_type == "v_prediction":
        target = noise_sched.get_velocity(z0, noise, t)
    else:
        target = noise
    per = (pred - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
    loss = (per * weights[t]).mean()
    aux = None
    if nets.aux_weight > 0:
        y = nets.labels[idx].clone()  # (B, H)
        y[drop] = -1  # a dropped caption says nothing about the scene
        aux = scene_loss(nets.both["aux"](enc.pooler_output), y, nets.classes)
        loss = loss + nets.aux_weight * aux
    nets.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(nets.params, 1.0)
    nets.opt.step()
    return loss.item(), None if aux is None else aux.item()


def train_base(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    minutes: float = 90.0,
    max_steps: int | None = None,
    cfg: BaseConfig | None = None,
    resume: bool = True,
    progress=print,
) -> Path:
    """Train (or continue training) the toy English base on ``data_dir`` (``iap-rt toy data``)
    and write its pipeline directory to ``out``."""
    import torch
    from diffusers import DDPMScheduler

    cfg = cfg or BaseConfig()
    torch.set_num_threads(cfg.threads)
    out = ensure_dir(out)
    ckpt = out / "checkpoint"
    x, texts, rows = load_training_data(data_dir)
    # tokenizer: every English word the world uses, one token each
    write_word_tokenizer(out / "tokenizer", captions.en_vocabulary(), cfg.max_length)
    tok = load_tokenizer(out / "tokenizer")
    vae, lat, err = pixel_latents(x)
    batches = Batches(lat, tokenize(tok, texts), tokenize(tok, [""])[0])
    nets = build_networks(cfg, tok, rows)
    noise_sched = DDPMScheduler.from_config(scheduler_config(cfg))
    weights = loss_weights(cfg, noise_sched)

    state = {"step": 0, "seconds": 0.0, "samples": 0}
    if resume and (ckpt / "checkpoint.safetensors").is_file():
        state = load_training_state(ckpt, nets.both, nets.ema, nets.opt)
        progress(f"resumed at step {state['step']} ({state['seconds'] / 60:.1f} cpu min trained)")
    n_unet = sum(p.numel() for p in nets.both["unet"].parameters())
    n_text = sum(p.numel() for p in nets.both["text"].parameters())
    progress(
        f"{len(x)} images, vae roundtrip max err {err:.1e}, unet {n_unet / 1e6:.2f}M, "
        f"text {n_text / 1e6:.2f}M params"
    )

    gen = torch.Generator().manual_seed(cfg.seed * 1000 + state["step"])
    # The budget counts this process's CPU time divided by its threads (the machine is shared;
    # on an idle machine it equals wall-clock time). Wall-clock time is recorded too.
    budget = minutes * 60.0 * cfg.threads
    t_last_ckpt = time.time()
    cpu_start = time.process_time() - state["seconds"]
    wall_start = time.time() - state.get("wall_seconds", state["seconds"])

    def save() -> None:
        state["seconds"] = time.process_time() - cpu_start
        state["wall_seconds"] = time.time() - wall_start
        save_training_state(ckpt, nets.both, nets.ema, nets.opt, state)

    running = 0.0
    while True:
        elapsed = time.process_time() - cpu_start
        if elapsed >= budget or (max_steps is not None and state["step"] >= max_steps):
            break
        step = state["step"]
        done = elapsed / budget
        if max_steps is not None:
            done = max(done, step / max(1, max_steps))
        lr = learning_rate(cfg, step, done)
        for g in nets.opt.param_groups:
            g["lr"] = lr
        loss, aux = train_step(cfg, nets, batches, noise_sched, weights, gen)
        if aux is not None:
            state["aux_loss"] = 0.98 * state.get("aux_loss", aux) + 0.02 * aux
        nets.ema.update(nets.both, step)
        state["step"] = step + 1
        state["samples"] += cfg.batch_size
        running = 0.98 * running + 0.02 * loss if step else loss
        if state["step"] % cfg.log_every == 0:
            el = time.process_time() - cpu_start
            aux_note = f" aux {state['aux_loss']:.3f}" if "aux_loss" in state else ""
            progress(
                f"step {state['step']} loss {running:.4f}{aux_note} lr {lr:.1e} "
                f"cpu {el / 60:.1f} min "
                f"wall {(time.time() - wall_start) / 60:.1f} min "
                f"({el / max(1, state['step']):.2f} cpu s/step)"
            )
        if time.time() - t_last_ckpt > cfg.checkpoint_minutes * 60:
            save()
            t_last_ckpt = time.time()
    save()
    data_meta_path = Path(data_dir) / "meta.json"
    data_meta = json.loads(data_meta_path.read_text("utf-8")) if data_meta_path.is_file() else {}
    record = {
        "config": asdict(cfg),
        "steps": state["step"],
        "samples_seen": state["samples"],
        "train_cpu_minutes": round(state["seconds"] / 60, 2),
        "train_wall_minutes": round(state.get("wall_seconds", state["seconds"]) / 60, 2),
        "vae_roundtrip_max_err": err,
        "params": {"unet": n_unet, "text_encoder": n_text},
        "data": {
            k: data_meta.get(k) for k in ("world", "version", "seed", "split_seed", "n_train")
        },
        "heldout": data_meta.get("heldout"),
        "torch_threads": cfg.threads,
    }
    write_pipeline(out, cfg, nets, vae, record)
    progress(f"saved {out} after {state['step']} steps, {state['seconds'] / 60:.1f} cpu min")
    return out


def write_pipeline(out: Path, cfg: BaseConfig, nets: Networks, vae, record: dict) -> None:
    """The diffusers directory: the EMA weights of UNet and text encoder (not the auxiliary
    head), the fixed VAE, scheduler, model index and the training ``record`` (toy_base.json)."""
    nets.ema.copy_to(nets.both)
    unet, text = nets.both["unet"].eval(), nets.both["text"].eval()
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text.save_pretrained(out / "text_encoder", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    write_json_atomic(out / "scheduler" / "scheduler_config.json", scheduler_config(cfg))
    write_json_atomic(out / "model_index.json", MODEL_INDEX)
    write_json_atomic(out / "toy_base.json", record)
