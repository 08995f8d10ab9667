"""The training loop of ``iap-rt train`` (accelerate): :func:`run` reads as numbered steps.

Determinism: every micro-batch draws its randomness (data order, caption dropout, latent
sample, noise, timestep, the encoder's dropout) from seeds derived from ``(seed, step,
micro-batch, process)``. A resumed run therefore repeats exactly what an uninterrupted run
does after the checkpoint's step, given the restored weights, AdamW state and LR schedule.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from iap_rt.fileio import ensure_dir, staging_dir, write_json_atomic
from iap_rt.train.checkpoint import load_checkpoint, prepare_resume, save_checkpoint
from iap_rt.train.config import TrainConfig
from iap_rt.train.dataset import CachedSet, batch_to, build_sets, make_batch, plan_sets, read_sets
from iap_rt.train.ema import EMA
from iap_rt.train.metrics import MetricsLog
from iap_rt.train.models import Frozen, check_base, check_encoder, load_encoder, load_frozen
from iap_rt.train.objectives import IapUNet, objective_loss
from iap_rt.train.validate import sample_images, validate

log = logging.getLogger("iap_rt.train")


def derive_seed(*parts) -> int:
    """A 60-bit seed from any tuple of values (stable across runs and machines)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


class EpochOrder:
    """Sample position ``p`` -> row ``perm(p // n)[p % n]``, one seeded permutation per epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + count)]


def lr_lambda(cfg: TrainConfig):
    """Linear warmup, then cosine to 0 at max_steps or constant."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass
class Session:
    """Everything one training run holds while it runs."""

    cfg: TrainConfig
    acc: object  # accelerate.Accelerator
    frozen: Frozen
    iap: IapUNet
    encoder: torch.nn.Module  # the ChineseTextEncoder (unwrapped)
    model: torch.nn.Module  # the same, as prepared by accelerate (DDP on multi-GPU)
    tok: object  # PromptTokenizer
    optimizer: object
    sched: object
    ema: EMA | None
    train_set: CachedSet
    val_set: CachedSet | None
    metrics: MetricsLog | None = None
    dtype: torch.dtype = torch.float32

    @property
    def samples_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.acc.num_processes


def run(cfg: TrainConfig, resume: bool = False, cache_only: bool = False) -> dict:
    """Train (or only build the cache); return the run summary."""
    # 1. check everything that needs no weights: values, directories, data, images, out/
    cfg.check()
    base, out = Path(cfg.base), Path(cfg.out)
    check_base(base)
    check_encoder(Path(cfg.encoder))
    triples, val_triples = read_sets(cfg)
    ckpt = None if cache_only else prepare_resume(out, cfg, resume)
    plan = plan_sets(cfg, triples, val_triples)

    # 2. accelerator, frozen English SD, trainable Chinese encoder
    acc = _accelerator(cfg)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
    frozen = load_frozen(base, acc.device, dtype)
    cross_dim = frozen.unet.config.cross_attention_dim
    encoder, tok = load_encoder(Path(cfg.encoder), cross_dim, cfg.max_length, cfg.seed)
    encoder.to(acc.device).train()

    # 3. data: fill the latent / English-embedding cache
    sets = build_sets(
        plan, cfg, frozen, tok, acc.device, acc.is_main_process, acc.wait_for_everyone
    )
    data = dataclasses.asdict(plan.report)
    if cache_only:
        return {"cache_only": True, "data": data}

    # 4. optimiser, schedule, EMA; restore a checkpoint
    iap = IapUNet(frozen.unet, cfg.layers)
    if cfg.gradient_checkpointing:
        frozen.unet.enable_gradient_checkpointing()
        encoder.encoder.gradient_checkpointing_enable()
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    optimizer = torch.optim.AdamW(
        encoder.parameters(), cfg.lr, betas, cfg.adam_eps, cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    ema = EMA(encoder, cfg.ema_decay) if cfg.ema_decay > 0 else None
    ck = load_checkpoint(ckpt) if ckpt is not None else None
    if ck is not None:
        encoder.load_state_dict(ck["encoder"])
        optimizer.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["state"]["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        log.warning("resuming from %s (step %d)", ckpt, ck["step"])
    model, optimizer = acc.prepare(encoder, optimizer)
    if ck is not None and acc.scaler is not None and ck["state"].get("scaler"):
        acc.scaler.load_state_dict(ck["state"]["scaler"])
    s = Session(cfg, acc, frozen, iap, encoder, model, tok, optimizer, sched, ema, *sets)
    s.dtype = dtype

    # 5. the loop
    start = ck["step"] if ck is not None else 0
    s.metrics = MetricsLog(ensure_dir(out) / "metrics.jsonl", start if ck is not None else None)
    summary = _loop(s, start)
    s.metrics.close()

    # 6. outputs: chinese_encoder/ (EMA weights when on), resolved config + summary
    summary.update(objective=cfg.objective, data=data)
    if acc.is_main_process:
        final = encoder
        if ema is not None:
            final = copy.deepcopy(encoder)
            ema.copy_to(final)
        record = {"config": dataclasses.asdict(cfg), "summary": summary}
        write_encoder(out / "chinese_encoder", final, tok.tokenizer, record)
        write_json_atomic(out / "train_config.json", record)
    if plan.report.bad:
        rep = plan.report
        log.warning(
            "%d of %d rows skipped (missing or corrupt images), e.g. %s",
            *(rep.bad, rep.rows, "; ".join(rep.bad_examples[:3])),
        )
    return summary


def _loop(s: Session, start: int) -> dict:
    """Optimizer steps ``start .. max_steps``; logs, validates and checkpoints on the way."""
    from tqdm import tqdm

    cfg, acc = s.cfg, s.acc
    order = EpochOrder(len(s.train_set), cfg.seed)
    bar = tqdm(
        total=cfg.max_steps,
        initial=start,
        desc=f"train {cfg.objective}",
        disable=not acc.is_local_main_process,
        dynamic_ncols=True,
    )
    t0 = t_last = time.perf_counter()
    last, window, val = start, [], {}
    for step in range(start, cfg.max_steps):
        lr = s.optimizer.param_groups[0]["lr"]
        loss, layers = _train_step(s, order, step)
        done = step + 1
        window.append(loss)
        bar.update(1)
        if done % max(1, cfg.log_every) == 0 or done == cfg.max_steps:
            now = time.perf_counter()
            sps = (done - last) * s.samples_per_step / max(now - t_last, 1e-9)
            mean = torch.tensor(sum(window) / len(window), device=acc.device)
            rec = {
                "step": done,
                "loss": acc.reduce(mean, reduction="mean").item(),
                "lr": lr,
                "samples_per_s": sps,
                "epoch": done * s.samples_per_step / len(s.train_set),
            }
            if layers:
                rec["layer_losses"] = layers
            if acc.is_main_process:
                s.metrics.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4g}", lr=f"{lr:.2e}", sps=f"{sps:.1f}")
            last, t_last, window = done, now, []
        if _due(cfg.val_every, done, cfg.max_steps) and s.val_set is not None:
            val = _validate(s, done) if acc.is_main_process else {}
        if _due(cfg.checkpoint_every, done, cfg.max_steps) or done == cfg.max_steps:
            if acc.is_main_process:
                _checkpoint(s, done)
            acc.wait_for_everyone()
    bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "steps": cfg.max_steps,
        "resumed_from": start,
        "elapsed_s": round(elapsed, 2),
        "samples_per_s": (cfg.max_steps - start) * s.samples_per_step / max(elapsed, 1e-9),
        "final_loss": _last_loss(Path(cfg.out) / "metrics.jsonl"),
        **val,
    }


def _train_step(s: Session, order: EpochOrder, step: int) -> tuple[float, list[float]]:
    """One optimizer step over ``grad_accum`` micro-batches; -> (loss, per-layer losses)."""
    cfg, acc = s.cfg, s.acc
    world, rank = acc.num_processes, acc.process_index
    total, layers = 0.0, []
    for micro in range(cfg.grad_accum):
        torch.manual_seed(derive_seed(cfg.seed, "dropout", step, micro, rank))
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "batch", step, micro, rank))
        pos = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
        b = make_batch(
            s.train_set, order.indices(pos, cfg.batch_size), g, s.frozen, cfg.caption_dropout
        )
        b = batch_to(b, acc.device, s.dtype)
        last = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if last else acc.no_sync(s.model):
            with acc.autocast():
                loss, per_layer = objective_loss(
                    cfg.objective, s.iap, s.frozen.scheduler, s.model, b, cfg.layer_norm
                )
            acc.backward(loss / cfg.grad_accum)
        total += loss.item() / cfg.grad_accum
        layers = layers or [0.0] * len(per_layer)
        layers = [a + p.item() / cfg.grad_accum for a, p in zip(layers, per_layer)]
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(s.model.parameters(), cfg.max_grad_norm)
    s.optimizer.step()
    s.sched.step()
    s.optimizer.zero_grad(set_to_none=True)
    if s.ema is not None:
        s.ema.update(s.encoder, step)
    return total, layers


def _due(every: int, done: int, max_steps: int) -> bool:
    return bool(every) and (done % every == 0 or done == max_steps)


def _validate(s: Session, done: int) -> dict:
    cfg = s.cfg
    val = validate(s.iap, s.frozen, s.encoder, s.val_set, cfg.batch_size, cfg.seed, s.acc.device)
    s.metrics.write({"step": done, **val})
    if cfg.sample_prompts:
        folder = Path(cfg.out) / "samples" / f"step-{done:08d}"
        sample_images(
            s.frozen,
            s.encoder,
            s.tok,
            cfg.sample_prompts,
            folder,
            cfg.resolution,
            cfg.sample_steps,
            cfg.seed,
            s.acc.device,
        )
    return val


def _checkpoint(s: Session, step: int) -> Path:
    state = {"lr_scheduler": s.sched.state_dict(), "config": dataclasses.asdict(s.cfg)}
    if s.acc.scaler is not None:
        state["scaler"] = s.acc.scaler.state_dict()
    return save_checkpoint(
        Path(s.cfg.out),
        step,
        s.cfg.keep_checkpoints,
        encoder=s.encoder.state_dict(),
        optimizer=s.optimizer.state_dict(),
        state=state,
        ema=s.ema.state_dict() if s.ema is not None else None,
    )


def write_encoder(path: Path, encoder, tokenizer, record: dict) -> Path:
    """Write ``chinese_encoder/`` (the format ``iap-rt export`` reads) atomically."""
    with staging_dir(path) as tmp:
        encoder.save(tmp, tokenizer=tokenizer)
        write_json_atomic(tmp / "iap_train.json", record)
        if path.exists():  # a resumed run that had already finished
            shutil.rmtree(path)
        os.replace(tmp, path)
    return path


def _last_loss(path: Path) -> float | None:
    loss = None
    if path.is_file():
        for line in path.read_text("utf-8").splitlines():
            loss = json.loads(line).get("loss", loss)
    return loss


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    mp = cfg.mixed_precision
    if mp != "no" and not torch.cuda.is_available():
        log.warning("mixed_precision=%s needs a GPU; training in fp32 on the CPU", mp)
        mp = "no"
    return Accelerator(mixed_precision=mp)
