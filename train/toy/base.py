"""Train the toy world's English base model: a miniature Stable Diffusion in diffusers format.

The output directory is an ordinary SD 1.x-shaped pipeline directory that ``iap-rt train
--base`` and ``iap-rt export --base`` load with ``from_pretrained`` (local files only)::

    unet/            UNet2DConditionModel (EMA weights), pixel-space 32x32x3 "latents"
    vae/             AutoencoderKL with fixed weights: a (near) lossless standardising identity
                     (see :mod:`iap_rt.train.toy.vae`), vae_scale_factor 1
    text_encoder/    CLIPTextModel, 64 wide x 3 layers (EMA weights)
    tokenizer/       CLIPTokenizer with a word-level vocabulary (vocab.json + merges.txt whose
                     merges spell out every caption word, so each word is one token)
    scheduler/       scheduler_config.json (diffusers field names)
    model_index.json
    toy_base.json    how it was trained: config, steps, samples seen, minutes, data meta

What made shape and position learnable (measured here, held-out English prompts): the
prototype's UNet (three levels on 16x16) and a first version of this one (five levels, attention
on every level below 32x32 with 8 heads 4-8 wide, batch 32) drew well-coloured blobs anywhere:
after ~1,900 steps shape 0.27 and position 0.19, i.e. chance. The five-level UNet itself was
the problem: at 2x2 every cell sees a different zero-padding pattern, so the bottleneck can
turn a caption into a layout. Self-attention over the 256 tokens of the 16x16 level, with
4-wide heads, took 42% of a training step; without attention at 32x32 and 16x16 and with
2 heads (16/32 wide) a sample costs 4.2 ms instead of 10.9 ms (fwd + bwd, 2 threads), so
batch 64 fits the budget. After 9 minutes (1,270 steps, 81k samples) the same evaluation gave
colour 1.0, shape 0.79, position 1.0. Which change mattered most is not isolated (one run
each; the old v-prediction run had also resumed from epsilon-trained weights, ~60k samples).

Training: plain v-prediction MSE (see ``min_snr_gamma``), 10% caption dropout (to ""), AdamW with
warm-up, EMA of UNet and text encoder. A wall-clock budget (``minutes``) counts across
resumes; checkpoints (safetensors: weights, EMA, optimiser moments, RNG, step) are written
every few minutes to ``OUT/checkpoint`` and training resumes from there.

torch / diffusers / transformers are imported inside functions (the ``toy`` CLI imports this
module only in the ``base`` command).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from iap_rt.errors import ArtifactNotFoundError, InputError
from iap_rt.fileio import ensure_dir, write_json_atomic, write_text_atomic
from iap_rt.train.toy import shapes as toydata

log = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class BaseConfig:
    """How the toy base model is built and trained."""

    # UNet (pixel space, 32x32x3)
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64, 64)  # 32 -> 16 -> 8 -> 4 -> 2
    # No attention at 32x32 and 16x16: self-attention over 256 tokens with 4-wide heads was
    # 42% of a training step; without it (and with 2 heads, 16/32 wide) a sample costs 4.2 ms
    # instead of 10.9 ms on this CPU (fwd + bwd, batch 64, 2 threads), so the 60-minute budget
    # sees 2.6x more samples. 32-wide heads are also in TensorRT's fused-MHA range.
    down_block_types: tuple[str, ...] = (
        "DownBlock2D",
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
    )
    layers_per_block: int = 1
    attention_heads: int = 2  # diffusers' attention_head_dim (= number of heads here)
    norm_num_groups: int = 8
    # CLIP text encoder
    text_width: int = 64  # = UNet cross_attention_dim
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 16  # tokens incl. BOS/EOS (captions have <= 10 words)
    # diffusion
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # DDPM's 1e-4 .. 0.02: pixel space needs the long tail
    beta_start: float = 0.0001
    beta_end: float = 0.02
    # v-prediction: with epsilon, x0 = (x_t - sqrt(1-a) eps) / sqrt(a) amplifies eps errors by
    # 1/sqrt(a) ~ 150 near t = T on this schedule; a 12-minute epsilon run drew the right
    # blobs on wildly wrong backgrounds. v keeps the early steps well conditioned.
    prediction_type: str = "v_prediction"
    # Loss weight per timestep. Plain v-MSE equals (1 + SNR) x the x0-MSE, so high-noise steps,
    # where the layout (position!) is decided, keep weight ~1. min-SNR-5 (min(SNR, 5) x the
    # x0-MSE) and plain epsilon-MSE (SNR x the x0-MSE) both vanish there: with them colour was
    # learned but position stayed at chance. 0 = plain v-MSE; > 0 = min-SNR with that gamma.
    min_snr_gamma: float = 0.0
    # optimisation
    batch_size: int = 64
    lr: float = 8e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    # Linear decay of the learning rate to 0 over this final fraction of the budget (CPU time, or
    # ``max_steps`` when that ends the run first); 0 = constant after warm-up (v1's base). A short
    # run ends on a cooled-down model instead of one still bouncing at the peak rate.
    lr_decay_fraction: float = 0.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    seed: int = 0
    threads: int = 2
    checkpoint_minutes: float = 3.0
    log_every: int = 50
    extra: dict = field(default_factory=dict)


# ---- tokenizer ---------------------------------------------------------------------------------
def word_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """vocab.json + merges for a CLIP BPE tokenizer that reads every word of ``words`` whole.

    The merges are *learned* by ordinary BPE on the word list itself until every word is one
    symbol (applying learned merges by rank reproduces the training segmentation, so each
    word becomes one token). The vocabulary holds every single character (plain and
    ``</w>``-final), every merged symbol, and BOS/EOS; unknown words fall back to pieces.
    """
    chars = sorted({ch for w in words for ch in w} | set("abcdefghijklmnopqrstuvwxyz"))
    tokens = chars + [ch + "</w>" for ch in chars]
    segs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words))]
    merges: list[str] = []
    while any(len(s) > 1 for s in segs):
        counts: dict[tuple[str, str], int] = {}
        for s in segs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        new = []
        for s in segs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new.append(tuple(out))
        segs = new
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_word_tokenizer(out: str | os.PathLike, words: list[str], max_length: int) -> Path:
    """Write a CLIPTokenizer directory (vocab.json, merges.txt, tokenizer_config.json)."""
    out = ensure_dir(out)
    vocab, merges = word_vocab(words)
    write_json_atomic(out / "vocab.json", vocab)
    write_text_atomic(out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    write_json_atomic(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_length,
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": EOS,
            "pad_token": EOS,
        },
    )
    return out


def load_tokenizer(path: str | os.PathLike):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer, texts: list[str]):
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


# ---- models ------------------------------------------------------------------------------------
def unet_config(cfg: BaseConfig) -> dict:
    up = tuple(
        "CrossAttnUpBlock2D" if "CrossAttn" in d else "UpBlock2D"
        for d in reversed(cfg.down_block_types)
    )
    return dict(
        sample_size=toydata.IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=up,
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.attention_heads,
        norm_num_groups=cfg.norm_num_groups,
    )


def text_config(cfg: BaseConfig, vocab_size: int, bos_id: int, eos_id: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        projection_dim=cfg.text_width,
    )


def scheduler_config(cfg: BaseConfig) -> dict:
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": cfg.prediction_type,
        "timestep_spacing": "trailing",
    }


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


# ---- data --------------------------------------------------------------------------------------
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
    rows = toydata.read_jsonl(path)
    if not rows:
        raise InputError(f"{path} has no rows", fix=f"iap-rt toy data --out {data_dir}")
    imgs = toydata.load_images(path, rows)  # (N, H, W, 3) uint8
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [r["en"] for r in rows], rows


# ---- checkpoints ---------------------------------------------------------------------------------
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


# ---- training ------------------------------------------------------------------------------------
def learning_rate(cfg: BaseConfig, step: int, done: float) -> float:
    """The rate at ``step`` with fraction ``done`` of the run behind: linear warm-up over
    ``warmup_steps``, constant, then (``lr_decay_fraction`` > 0) linear decay to 0 at the end."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.lr_decay_fraction > 0:
        lr *= min(1.0, max(0.0, (1.0 - done) / cfg.lr_decay_fraction))
    return lr


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


def train_base(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    minutes: float = 50.0,
    max_steps: int | None = None,
    cfg: BaseConfig | None = None,
    resume: bool = True,
    progress=print,
    words: list[str] | None = None,
    aux_labels=None,
) -> Path:
    """Train (or continue training) the toy base model and write the pipeline dir to ``out``.

    ``words``: the English words the tokenizer reads whole (default: toy world v1's).
    ``aux_labels``: ``rows -> (labels (N, H) int64, classes per head)`` for the auxiliary
    scene-from-text loss that ``cfg.extra["text_aux_weight"] > 0`` turns on: a linear head on
    the text encoder's pooled (EOS) state predicts each head's class (-1: no label), cross
    entropy averaged over the labelled heads, added to the diffusion loss with that weight.
    The head is training-only (kept in the checkpoint, not in the pipeline directory): it
    stands in for the image-text pretraining that SD's CLIP encoder had before SD was trained."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from iap_rt.train.ema import EMA
    from iap_rt.train.toy.vae import build_pixel_vae, roundtrip_error

    cfg = cfg or BaseConfig()
    torch.set_num_threads(cfg.threads)
    out = ensure_dir(out)
    ckpt = out / "checkpoint"
    x, captions, rows = load_training_data(data_dir)
    meta_path = Path(data_dir) / "meta.json"
    data_meta = json.loads(meta_path.read_text("utf-8")) if meta_path.is_file() else {}

    # tokenizer: every English word the world uses, one token each
    words = words if words is not None else toydata.en_vocabulary()
    write_word_tokenizer(out / "tokenizer", words, cfg.max_length)
    tok = load_tokenizer(out / "tokenizer")
    ids = tokenize(tok, captions)  # (N, S)
    empty_ids = tokenize(tok, [""])[0]  # (S,)

    # the fixed pixel VAE, standardising with this dataset's per-channel statistics
    mean = tuple(float(v) for v in x.mean((0, 2, 3)))
    std = tuple(float(v) for v in x.std((0, 2, 3)))
    vae = build_pixel_vae(mean, std)
    err = roundtrip_error(vae, x[:256])
    with torch.no_grad():
        lat = torch.cat(
            [vae.encode(x[i : i + 1024]).latent_dist.mode() for i in range(0, len(x), 1024)]
        )
    lat = lat * vae.config.scaling_factor  # (N, 3, 32, 32)

    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(**unet_config(cfg))
    text = CLIPTextModel(
        CLIPTextConfig(**text_config(cfg, len(tok.get_vocab()), tok.bos_token_id, tok.eos_token_id))
    )
    unet.train()
    text.train()
    modules = {"unet": unet, "text": text}
    aux_weight = float(cfg.extra.get("text_aux_weight", 0.0))
    if aux_weight > 0:
        if aux_labels is None:
            raise InputError("text_aux_weight > 0 needs aux_labels (scene labels per row)")
        labels, classes = aux_labels(rows)  # (N, H), per-head class counts
        modules["aux"] = torch.nn.Linear(cfg.text_width, sum(classes))
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    both = torch.nn.ModuleDict(modules)  # one EMA and checkpoint for all
    ema = EMA(both, cfg.ema_decay)
    noise_sched = DDPMScheduler.from_config(scheduler_config(cfg))
    alphas_cumprod = noise_sched.alphas_cumprod.float()  # (T,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if cfg.min_snr_gamma > 0:
        denom = snr + 1 if cfg.prediction_type == "v_prediction" else snr
        loss_weight = torch.clamp(snr, max=cfg.min_snr_gamma) / denom  # (T,)
    else:
        loss_weight = torch.ones_like(snr)

    state = {"step": 0, "seconds": 0.0, "samples": 0}
    if resume and (ckpt / "checkpoint.safetensors").is_file():
        state = load_training_state(ckpt, both, ema, opt)
        progress(f"resumed at step {state['step']} ({state['seconds'] / 60:.1f} cpu min trained)")
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text.parameters())
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
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        z0 = lat[idx]  # (B, 3, 32, 32)
        tids = ids[idx].clone()  # (B, S)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        tids[drop] = empty_ids
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        enc = text(tids)
        ctx = enc.last_hidden_state  # (B, S, D)
        pred = unet(zt, t, ctx).sample
        if cfg.prediction_type == "v_prediction":
            target = noise_sched.get_velocity(z0, noise, t)
        else:
            target = noise
        per = (pred - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        loss = (per * loss_weight[t]).mean()
        if aux_weight > 0:
            y = labels[idx].clone()  # (B, H)
            y[drop] = -1  # a dropped caption says nothing about the scene
            aux = scene_loss(both["aux"](enc.pooler_output), y, classes)
            loss = loss + aux_weight * aux
            state["aux_loss"] = 0.98 * state.get("aux_loss", aux.item()) + 0.02 * aux.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(both, step)
        state["step"] = step + 1
        state["samples"] += cfg.batch_size
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
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
            state["seconds"] = time.process_time() - cpu_start
            state["wall_seconds"] = time.time() - wall_start
            save_training_state(ckpt, both, ema, opt, state)
            t_last_ckpt = time.time()
    state["seconds"] = time.process_time() - cpu_start
    state["wall_seconds"] = time.time() - wall_start
    save_training_state(ckpt, both, ema, opt, state)

    # the shipped weights are the EMA weights
    ema.copy_to(both)
    unet.eval()
    text.eval()
    unet.save_pretrained(out / "unet", safe_serialization=True)
    text.save_pretrained(out / "text_encoder", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    write_json_atomic(out / "scheduler" / "scheduler_config.json", scheduler_config(cfg))
    write_json_atomic(out / "model_index.json", MODEL_INDEX)
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
    write_json_atomic(out / "toy_base.json", record)
    progress(f"saved {out} after {state['step']} steps, {state['seconds'] / 60:.1f} cpu min")
    return out


def shipped_base_dir(name: str, command: str) -> Path:
    """A toy English base shipped as package data (``iap_rt/data/NAME``); ``command``: the
    ``iap-rt`` command group whose ``base`` command trains one."""
    from importlib import resources

    path = Path(str(resources.files("iap_rt") / "data" / name))
    if not (path / "model_index.json").is_file():
        raise ArtifactNotFoundError(
            f"{path} is missing: this install has no shipped {name}",
            fix=f"reinstall iap-rt, or train one: iap-rt {command} data --out D && "
            f"iap-rt {command} base --data D --out BASE",
        )
    return path


def load_base(path: str | os.PathLike):
    """(tokenizer, text_encoder, unet, vae, scheduler config) of a toy base directory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise ArtifactNotFoundError(
                f"{path / sub} is missing: {path} is not a diffusers pipeline directory",
                fix="iap-rt toy base --data DATA --out DIR",
            )
    tok = load_tokenizer(path / "tokenizer")
    text = CLIPTextModel.from_pretrained(str(path / "text_encoder"), local_files_only=True).eval()
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"), local_files_only=True).eval()
    vae = AutoencoderKL.from_pretrained(str(path / "vae"), local_files_only=True).eval()
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text("utf-8"))
    return tok, text, unet, vae, sched
