"""The training loop of ``iap-rt train`` (accelerate): :func:`run` reads as numbered steps.

One code path for 1..N processes on 1..M machines (gloo on the CPU, NCCL on GPUs). The
``B = batch_size x grad_accum x processes`` samples of step ``s`` are the global positions
``s*B .. s*B + B-1``; micro-batch ``m`` of rank ``r`` takes the ``k = m * processes + r``-th
``batch_size`` of them. Every random draw of a sample (data order aside, which is a seeded
permutation per epoch) comes from that sample's position (:mod:`~iap_rt.train.sample_rng`),
so the trajectory depends on the global batch only, not on how it is split, and a resumed
run repeats exactly what an uninterrupted run does after the checkpoint's step.

Rank discipline: the cache is built by all ranks (each its share); only rank 0 writes
checkpoints, metrics, samples and the final encoder, and prints progress. A signal stops
every rank at the same step, after rank 0 has written a checkpoint of it
(:mod:`~iap_rt.train.runctl`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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
from iap_rt.train import sample_rng
from iap_rt.train.checkpoint import load_checkpoint, prepare_resume, save_checkpoint
from iap_rt.train.config import TrainConfig
from iap_rt.train.dataset import CachedSet, batch_to, build_sets, make_batch, plan_sets, read_sets
from iap_rt.train.ema import EMA
from iap_rt.train.metrics import MetricsLog
from iap_rt.train.models import Frozen, check_base, check_encoder, load_encoder, load_frozen
from iap_rt.train.objectives import IapUNet, objective_loss
from iap_rt.train.runctl import (
    ProcessGroupError,
    StopSignals,
    TrainingInterrupted,
    agree,
    lost_peer,
    resume_command,
    signal_name,
)
from iap_rt.train.sample_rng import derive_seed, encoder_seed, sample_seed
from iap_rt.train.validate import sample_images, validate

log = logging.getLogger("iap_rt.train")


class EpochOrder:
    """Sample position ``p`` -> index ``perm(p // n)[p % n]``, one seeded permutation per epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, positions: range) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in positions]


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
    model: torch.nn.Module  # the same, as prepared by accelerate (DDP with several processes)
    tok: object  # PromptTokenizer
    optimizer: object
    sched: object
    ema: EMA | None
    train_set: CachedSet
    val_set: CachedSet | None
    stop: StopSignals
    command: str  # the command line of this run (for the resume hint)
    metrics: MetricsLog | None = None
    dtype: torch.dtype = torch.float32
    step: int = 0  # optimizer steps done
    saved: int = -1  # step of the newest checkpoint

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.acc.num_processes


def run(
    cfg: TrainConfig, resume: bool = False, cache_only: bool = False, command: str = ""
) -> dict:
    """Train (or only build the cache); return the run summary (``main``: rank 0's)."""
    command = command or "iap-rt train"
    # 1. check everything that needs no weights: values, directories, data files
    cfg.check()
    base, out = Path(cfg.base), Path(cfg.out)
    check_base(base)
    check_encoder(Path(cfg.encoder))
    rows, val_rows = read_sets(cfg)

    # 2. join the other processes; check the run directory and the images
    acc = _accelerator(cfg)
    main, world = acc.is_main_process, acc.num_processes
    if not main:
        _quiet()
    ckpt = None if cache_only else prepare_resume(out, cfg, resume, world)

    s: Session | None = None
    with StopSignals(announce=main) as stop:
        try:
            plan = plan_sets(cfg, rows, val_rows, acc.process_index, world)

            # 3. frozen English SD, trainable Chinese encoder (dropout per sample)
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
                acc.mixed_precision, torch.float32
            )
            frozen = load_frozen(base, acc.device, dtype)
            cross_dim = frozen.unet.config.cross_attention_dim
            encoder, tok = load_encoder(Path(cfg.encoder), cross_dim, cfg.max_length, cfg.seed)
            encoder.to(acc.device).train()
            sample_rng.install(encoder)

            # 4. data: every rank encodes its share of what the cache lacks
            sets = build_sets(
                plan, cfg, frozen, tok, acc.device, acc.process_index, world,
                acc.wait_for_everyone, lambda: stop.requested,
            )  # fmt: skip
            data = dataclasses.asdict(plan.report)
            sig = agree(acc, stop.signum)
            if sig:
                raise TrainingInterrupted(
                    f"interrupted while building the cache in {plan.report.cache_dir} "
                    "(the shards written are kept)",
                    f"run the same command again to continue: {resume_command(command, resume)}",
                    sig,
                )
            if cache_only:
                return {"cache_only": True, "data": data, "main": main}

            # 5. optimiser, schedule, EMA; restore a checkpoint
            s = _session(cfg, acc, frozen, encoder, tok, sets, ckpt, stop, command, dtype)

            # 6. the loop
            if main:
                s.metrics = MetricsLog(ensure_dir(out) / "metrics.jsonl", s.step if ckpt else None)
            summary = _loop(s)
        except Exception as e:
            if lost_peer(e, world):
                when = f"after step {s.step}" if s is not None else "while starting"
                why = str(e).splitlines()[0].split(". This is typically")[0][-200:]
                raise ProcessGroupError(
                    f"rank {acc.process_index}: lost the other processes {when} "
                    f"({why}); one of them stopped or died",
                    fix="see the first error of the job; then resume with: "
                    + resume_command(command, True),
                ) from e
            raise
    if s.metrics is not None:
        s.metrics.close()

    # 7. outputs: chinese_encoder/ (EMA weights when on), resolved config + summary
    summary.update(objective=cfg.objective, data=data, main=main, processes=world)
    if main:
        sample_rng.uninstall_attention(encoder)
        final = encoder
        if s.ema is not None:
            final = copy.deepcopy(encoder)
            s.ema.copy_to(final)
        record = {"config": dataclasses.asdict(cfg), "summary": summary}
        write_encoder(out / "chinese_encoder", final, tok.tokenizer, record)
        write_json_atomic(out / "train_config.json", record)
    acc.wait_for_everyone()
    if plan.report.bad and main:
        rep = plan.report
        log.warning(
            "%d of %d rows skipped (missing or corrupt images), e.g. %s",
            *(rep.bad, rep.rows, "; ".join(rep.bad_examples[:3])),
        )
    return summary


def _session(cfg, acc, frozen, encoder, tok, sets, ckpt, stop, command, dtype) -> Session:
    """Optimizer, LR schedule, EMA, the prepared model; state restored from ``ckpt``."""
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
    s = Session(
        cfg, acc, frozen, iap, encoder, model, tok, optimizer, sched, ema, *sets, stop, command
    )
    s.dtype = dtype
    if ck is not None:
        s.step = s.saved = ck["step"]
    return s


def _loop(s: Session) -> dict:
    """Optimizer steps ``s.step .. max_steps``; logs, validates and checkpoints on the way."""
    from tqdm import tqdm

    cfg, acc = s.cfg, s.acc
    start = s.step
    order = EpochOrder(len(s.train_set), cfg.seed)
    bar = tqdm(
        total=cfg.max_steps,
        initial=start,
        desc=f"train {cfg.objective}",
        disable=not acc.is_main_process,
        dynamic_ncols=True,
    )
    t0 = t_last = time.perf_counter()
    last, window, val = start, [], {}
    try:
        for step in range(start, cfg.max_steps):
            lr = s.optimizer.param_groups[0]["lr"]
            losses = _train_step(s, order, step)
            s.step = done = step + 1
            window.append(losses)
            bar.update(1)
            if done % max(1, cfg.log_every) == 0 or done == cfg.max_steps:
                now = time.perf_counter()
                rec = _log(s, window, lr, (done - last) * s.global_batch / max(now - t_last, 1e-9))
                bar.set_postfix(
                    loss=f"{rec['loss']:.4g}", lr=f"{lr:.2e}", sps=f"{rec['samples_per_s']:.1f}"
                )
                last, t_last, window = done, now, []
            if _due(cfg.val_every, done, cfg.max_steps) and s.val_set is not None:
                val = _validate(s, done) if acc.is_main_process else {}
            if _due(cfg.checkpoint_every, done, cfg.max_steps) or done == cfg.max_steps:
                _checkpoint(s)
            sig = agree(acc, s.stop.signum) if done < cfg.max_steps else None
            if sig:
                _stop(s, sig)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "steps": cfg.max_steps,
        "resumed_from": start,
        "elapsed_s": round(elapsed, 2),
        "samples_per_s": (cfg.max_steps - start) * s.global_batch / max(elapsed, 1e-9),
        "global_batch": s.global_batch,
        "final_loss": _last_loss(Path(cfg.out) / "metrics.jsonl"),
        **val,
    }


def _log(s: Session, window: list[list[float]], lr: float, sps: float) -> dict:
    """The metrics line of step ``s.step``: losses averaged over the window and the ranks."""
    mean = torch.tensor(window, device=s.acc.device).mean(0)  # (1 + layers,)
    mean = s.acc.reduce(mean, reduction="mean").tolist()
    rec = {
        "step": s.step,
        "loss": mean[0],
        "lr": lr,
        "samples_per_s": sps,
        "epoch": s.step * s.global_batch / len(s.train_set),
    }
    if len(mean) > 1:
        rec["layer_losses"] = mean[1:]
    if s.metrics is not None:
        s.metrics.write(rec)
    return rec


def _stop(s: Session, sig: int) -> None:
    """Every rank: checkpoint the current step (rank 0 writes it), then raise."""
    path = _checkpoint(s)
    if not s.acc.is_main_process:
        raise TrainingInterrupted(
            f"rank {s.acc.process_index}: stopped with rank 0 at step {s.step}", None, sig
        )
    where = f"checkpoint {path}" if path else f"the checkpoint of step {s.step}"
    raise TrainingInterrupted(
        f"stopped by {signal_name(sig)} at step {s.step} of {s.cfg.max_steps}; {where} is complete",
        f"resume with: {resume_command(s.command, True)}",
        sig,
    )


def _train_step(s: Session, order: EpochOrder, step: int) -> list[float]:
    """One optimizer step over ``grad_accum`` micro-batches; -> [loss, per-layer losses...]."""
    cfg, acc = s.cfg, s.acc
    world, rank, b = acc.num_processes, acc.process_index, cfg.batch_size
    totals: list[float] = []
    for micro in range(cfg.grad_accum):
        k = micro * world + rank  # this micro-batch's place in the global batch
        first = step * s.global_batch + k * b
        positions = range(first, first + b)
        seeds = [sample_seed(cfg.seed, p) for p in positions]
        batch = make_batch(
            s.train_set, order.indices(positions), seeds, s.frozen, cfg.caption_dropout
        )
        batch = batch_to(batch, acc.device, s.dtype)
        sync = micro == cfg.grad_accum - 1
        with acc.no_sync(s.model) if not sync else contextlib.nullcontext():
            dropout_seeds = [encoder_seed(cfg.seed, p) for p in positions]
            with acc.autocast(), sample_rng.per_sample(dropout_seeds):
                loss, per_layer = objective_loss(
                    cfg.objective, s.iap, s.frozen.scheduler, s.model, batch, cfg.layer_norm
                )
            acc.backward(loss / cfg.grad_accum)
        values = [loss.item(), *(p.item() for p in per_layer)]
        totals = [a + v / cfg.grad_accum for a, v in zip(totals or [0.0] * len(values), values)]
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(s.model.parameters(), cfg.max_grad_norm)
    s.optimizer.step()
    s.sched.step()
    s.optimizer.zero_grad(set_to_none=True)
    if s.ema is not None:
        s.ema.update(s.encoder, step)
    return totals


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


def _checkpoint(s: Session) -> Path | None:
    """Rank 0 writes the checkpoint of ``s.step`` (once); every rank waits for it."""
    path = None
    if s.acc.is_main_process and s.saved != s.step:
        state = {
            "lr_scheduler": s.sched.state_dict(),
            "config": dataclasses.asdict(s.cfg),
            "processes": s.acc.num_processes,
            "global_batch": s.global_batch,
        }
        if s.acc.scaler is not None:
            state["scaler"] = s.acc.scaler.state_dict()
        path = save_checkpoint(
            Path(s.cfg.out),
            s.step,
            s.cfg.keep_checkpoints,
            encoder=s.encoder.state_dict(),
            optimizer=s.optimizer.state_dict(),
            state=state,
            ema=s.ema.state_dict() if s.ema is not None else None,
        )
    s.saved = s.step
    s.acc.wait_for_everyone()
    return path


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


def _quiet() -> None:
    """Ranks other than 0 print errors only (no warnings, no progress bars)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    logging.getLogger("iap_rt").setLevel(logging.ERROR)
    for lib in (tlog, dlog):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def _accelerator(cfg: TrainConfig):
    """Accelerate joins the processes torchrun/accelerate launch/``--num-processes`` started
    (from RANK/WORLD_SIZE/...): NCCL on GPUs; on a machine without CUDA it must be told it is
    on the CPU, or every process would train alone."""
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp != "no" and cpu:
        log.warning("mixed_precision=%s needs a GPU; training in fp32 on the CPU", mp)
        mp = "no"
    try:
        return Accelerator(mixed_precision=mp, cpu=cpu)
    except (RuntimeError, ValueError) as e:
        raise ProcessGroupError(
            f"could not join the other training processes: {str(e).splitlines()[0][:200]}",
            fix="check --main-process-ip/--main-process-port (a free port, reachable from "
            "every machine) and that every machine runs the same command.",
        ) from e
