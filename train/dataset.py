"""Training/validation sets over the cache: plan, encode what is missing, batch.

:func:`plan_sets` hashes and checks the images and splits the rows without any model;
:func:`build_sets` then fills the cache, every process encoding its share, and returns
:class:`CachedSet` objects. A set is row ids into the :class:`~iap_rt.train.rows.Rows` of its
data file plus the caches; Chinese captions are tokenized per micro-batch (a tokenized
million-row set would take a GB). :func:`make_batch` draws each sample's randomness (caption
dropout, latent sample, noise, timestep) from that sample's own seed
(:func:`~iap_rt.train.sample_rng.sample_seed`), so a sample is the same whichever process,
micro-batch or resumed run draws it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from iap_rt.errors import InputError
from iap_rt.tokenizer import PromptTokenizer
from iap_rt.train.config import TrainConfig
from iap_rt.train.imageindex import ImageIndex, ScanResult, gather_objects, scan_images
from iap_rt.train.latent_cache import (
    ShardCache,
    await_entries,
    check_bad,
    dir_fingerprint,
    fill_cache,
    load_image,
    owner,
    text_key,
)
from iap_rt.train.models import Frozen
from iap_rt.train.rows import Rows, read_rows
from iap_rt.train.sample_rng import derive_seed

VAE_CHUNK = 8  # images per VAE call while caching
TEXT_CHUNK = 32  # captions per CLIP call while caching


@dataclass
class CachedSet:
    """Rows of a data file whose image latents and English embeddings are in the cache."""

    table: Rows
    rows: np.ndarray  # (N,) int64 row ids in ``table``
    image_keys: dict[int, str]  # image index in table.images -> sha256 of its bytes
    latents: ShardCache
    english: ShardCache
    tok: PromptTokenizer  # the Chinese tokenizer

    def __len__(self) -> int:
        return len(self.rows)

    def image_key(self, i: int) -> str:
        return self.image_keys[int(self.table.image[self.rows[i]])]

    def zh(self, i: int) -> str:
        return self.table.zh[int(self.rows[i])]

    def en(self, i: int) -> str:
        return self.table.en[int(self.rows[i])]


@dataclass
class DataReport:
    rows: int = 0
    usable: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    val_rows: int = 0
    images_hashed: int = 0
    latents_encoded: int = 0
    english_encoded: int = 0
    cache_dir: str = ""


def cache_dirs(cfg: TrainConfig) -> tuple[Path, Path]:
    """Latent and English cache directories (keyed by model fingerprint and resolution)."""
    base = Path(cfg.base)
    root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / "cache"
    vae = dir_fingerprint(base / "vae", ("*.json", "*.safetensors"))
    text = hashlib.sha256(
        (
            dir_fingerprint(base / "text_encoder", ("*.json", "*.safetensors"))
            + dir_fingerprint(base / "tokenizer", ("*",))
        ).encode()
    ).hexdigest()[:16]
    return root / f"latents-{vae}-r{cfg.resolution}", root / f"english-{text}"


@dataclass
class Split:
    """One data file's rows, its image scan, and the row ids of one set."""

    table: Rows
    scan: ScanResult
    ids: np.ndarray  # (n,) int64 row ids (bad rows included until filtered)

    def usable_ids(self) -> np.ndarray:
        return self.ids[np.isin(self.ids, self.scan.usable)]


@dataclass
class Plan:
    """What :func:`plan_sets` found: the splits, the caches, the report."""

    latents: ShardCache
    english: ShardCache
    train: Split
    val: Split | None
    report: DataReport
    max_bad_fraction: float = 0.05

    def splits(self) -> list[Split]:
        return [self.train] + ([self.val] if self.val is not None else [])


def read_sets(cfg: TrainConfig) -> tuple[Rows, Rows | None]:
    """Parse --data (and val_data) up front, before any model is loaded."""
    return read_rows(cfg.data), (read_rows(cfg.val_data) if cfg.val_data else None)


def plan_sets(
    cfg: TrainConfig,
    rows: Rows,
    val_rows: Rows | None,
    rank: int = 0,
    world: int = 1,
    gather=None,
) -> Plan:
    """Key and check every image (the ranks share the hashing), split off validation rows;
    loads no model; writes nothing but the image index."""
    lat_dir, en_dir = cache_dirs(cfg)
    latents, english = ShardCache(lat_dir), ShardCache(en_dir)
    index, main = ImageIndex(lat_dir.parent), rank == 0
    kw = dict(progress=main, rank=rank, world=world, gather=gather or gather_objects(world))
    scan = scan_images(rows, latents, index, **kw)
    check_bad(rows, scan, cfg.max_bad_fraction, quiet=not main)
    if val_rows is not None:
        vscan = scan_images(val_rows, latents, index, **kw)
        check_bad(val_rows, vscan, cfg.max_bad_fraction, quiet=not main)
        train = Split(rows, scan, np.arange(len(rows), dtype=np.int64))
        val = Split(val_rows, vscan, np.arange(len(val_rows), dtype=np.int64))
    else:
        keep, held = _hold_out(len(rows), cfg.val_count, cfg.seed)
        train = Split(rows, scan, keep)
        val = Split(rows, scan, held) if len(held) else None
    if main:
        index.save()
    plan = Plan(latents, english, train, val, DataReport(), cfg.max_bad_fraction)
    _report(plan, str(lat_dir.parent))
    return plan


def _report(plan: Plan, cache_dir: str) -> None:
    rows, scan = plan.train.table, plan.train.scan
    rep = plan.report
    rep.rows, rep.usable, rep.cache_dir = len(rows), len(scan.usable), cache_dir
    rep.bad = len(rows) - len(scan.usable)
    bad_rows = np.flatnonzero(np.isin(rows.image, np.fromiter(scan.bad, np.int64)))[:10]
    rep.bad_examples = [f"{rows.where(r)}: {scan.bad[int(rows.image[r])]}" for r in bad_rows]
    rep.val_rows = len(plan.val.usable_ids()) if plan.val is not None else 0
    rep.images_hashed = sum(sp.scan.hashed for sp in plan.splits())


def _hold_out(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` seeded rows of ``n`` for validation (chosen among all rows, so the split does
    not move when an image turns out to be bad later)."""
    if count == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, np.int64)
    if count >= n:
        raise InputError(
            f"val_count {count} leaves no training rows ({n} rows)",
            fix="lower --val-count or pass a separate --val-data file.",
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    held = np.sort(perm[-count:])
    return np.setdiff1d(np.arange(n, dtype=np.int64), held), held


def build_sets(
    plan: Plan,
    cfg: TrainConfig,
    frozen: Frozen,
    tok: PromptTokenizer,
    device,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[CachedSet, CachedSet | None]:
    """Encode what the cache lacks (each rank its share), wait for all, return the sets."""
    latents, english, rep = plan.latents, plan.english, plan.report
    main = rank == 0
    images: dict[str, tuple[Rows, int]] = {}
    for sp in plan.splits():
        for i, key in sp.scan.keys.items():
            if i not in sp.scan.bad and key not in latents and owner(key, world) == rank:
                images.setdefault(key, (sp.table, i))
    texts = {text_key(""): ""} if owner(text_key(""), world) == rank else {}
    for sp in plan.splits():
        col = sp.table.en
        for r in sp.usable_ids().tolist():
            en = col[r]
            key = text_key(en)
            if key not in english and owner(key, world) == rank:
                texts[key] = en
    barrier()  # every rank has scanned the cache before any rank adds to it
    before = [len(c) + len(c.bad) for c in (latents, english)]
    kw = dict(rank=rank, world=world, progress=main, stop=stop)
    n_img = fill_cache(
        latents,
        images,
        lambda refs: _encode_images(frozen, refs, cfg, device),
        VAE_CHUNK,
        **kw,
        what="images",
    )
    n_txt = fill_cache(
        english,
        texts,
        lambda ts: _encode_texts(frozen, ts, device),
        TEXT_CHUNK,
        **kw,
        what="captions",
    )
    rep.latents_encoded, rep.english_encoded = _sum_counts(n_img, n_txt, world, device)
    barrier()
    await_entries(latents, before[0] + rep.latents_encoded)
    await_entries(english, before[1] + rep.english_encoded)
    for sp in plan.splits():
        sp.scan.refresh(sp.table, latents)
        check_bad(sp.table, sp.scan, plan.max_bad_fraction, quiet=True)
    _report(plan, rep.cache_dir)
    train = _cached_set(plan.train, latents, english, tok)
    val = _cached_set(plan.val, latents, english, tok) if plan.val is not None else None
    return train, val


def _sum_counts(n_img: int, n_txt: int, world: int, device) -> tuple[int, int]:
    if world == 1:
        return n_img, n_txt
    import torch.distributed as dist

    t = torch.tensor([n_img, n_txt], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t[0]), int(t[1])


def _cached_set(sp: Split, latents, english, tok) -> CachedSet:
    return CachedSet(sp.table, sp.usable_ids(), sp.scan.keys, latents, english, tok)


@torch.no_grad()
def _encode_images(frozen: Frozen, refs: list, cfg: TrainConfig, device) -> list:
    """(rows, image index) refs -> per ref a (2, C, h, w) tensor (mean, std) or the reason it
    failed to decode."""
    vae = frozen.vae
    out: list = [None] * len(refs)
    good, xs = [], []
    for j, (rows, i) in enumerate(refs):
        try:
            xs.append(load_image(rows.images.read(i), cfg.resolution))  # (3, R, R)
            good.append(j)
        except Exception as e:  # unreadable, truncated, unsupported: PIL raises many types
            out[j] = f"not a readable image: {type(e).__name__}: {e}"
    if xs:
        dist = vae.encode(torch.stack(xs).to(device, vae.dtype)).latent_dist
        moments = torch.stack([dist.mean, dist.std], dim=1)  # (n, 2, C, R/8, R/8)
        for j, m in zip(good, moments):
            out[j] = m
    return out


@torch.no_grad()
def _encode_texts(frozen: Frozen, texts: list[str], device) -> torch.Tensor:
    tok = frozen.tokenizer
    ids = tok(
        texts,
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # (n, S_en)
    return frozen.text_encoder(ids.to(device))[0]  # (n, S_en, D)


class _FewTruncations(logging.Filter):
    """Let the tokenizer's "prompt is too long" warning through 3 times, not every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "is too long" not in str(record.msg):
            return True
        self.seen += 1
        return self.seen <= 3


_truncations = _FewTruncations()
logging.getLogger("iap_rt").addFilter(_truncations)


def make_batch(ds: CachedSet, idx: list[int], seeds: list[int], frozen: Frozen, dropout: float):
    """One micro-batch on the CPU: sample ``idx[j]`` of ``ds`` with its own seed ``seeds[j]``
    (caption dropout, then the latent sample, the noise and the timestep, in that order)."""
    vae, sched = frozen.vae.config, frozen.scheduler
    shift = getattr(vae, "shift_factor", None) or 0.0
    zs, noises, ts, zh, en = [], [], [], [], []
    for i, s in zip(idx, seeds):
        g = torch.Generator().manual_seed(s)
        drop = bool(torch.rand(1, generator=g).item() < dropout)  # both captions -> ""
        mom = ds.latents.get(ds.image_key(i))  # (2, C, h, w)
        z = mom[0] + mom[1] * torch.randn(mom[0].shape, generator=g)  # (C, h, w)
        zs.append((z - shift) * vae.scaling_factor)
        noises.append(torch.randn(z.shape, generator=g))  # (C, h, w)
        ts.append(torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g))
        zh.append("" if drop else ds.zh(i))
        en.append(ds.english.get(text_key("" if drop else ds.en(i))))  # (S_en, D)
    z, noise, t = torch.stack(zs), torch.stack(noises), torch.cat(ts)  # (B, C, h, w) x2, (B,)
    enc = ds.tok(zh)
    return {
        "latents": z,
        "noise": noise,
        "t": t,
        "x_t": sched.add_noise(z, noise, t),  # (B, C, h, w)
        "en": torch.stack(en),  # (B, S_en, D)
        "zh_ids": torch.from_numpy(enc.input_ids),  # (B, S_zh)
        "zh_mask": torch.from_numpy(enc.attention_mask),  # (B, S_zh)
    }


def val_seeds(seed: int, idx: list[int]) -> list[int]:
    """Fixed per-row seeds of validation batches (the same at every validation)."""
    return [derive_seed(seed, "val", i) for i in idx]


def batch_to(batch: dict, device, dtype) -> dict:
    """Move a batch to ``device``; float tensors to ``dtype`` (the frozen models' dtype)."""
    return {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()
    }
