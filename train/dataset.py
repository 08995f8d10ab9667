"""Training/validation sets over the cache: scan, encode what is missing, tokenize, batch.

:func:`plan_sets` checks the rows and images without any model; :func:`build_sets` then
fills the cache and returns :class:`CachedSet` objects (VAE moments and English embeddings
in :class:`~iap_rt.train.data.ShardCache` shards, Chinese captions tokenized in memory).
:func:`make_batch` draws one micro-batch's randomness (caption dropout, latent sample,
noise, timestep) from a generator the caller seeds per step, so a resumed run draws exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from iap_rt.errors import InputError
from iap_rt.tokenizer import PromptTokenizer
from iap_rt.train.config import TrainConfig
from iap_rt.train.data import (
    ShardCache,
    Triple,
    check_bad,
    dir_fingerprint,
    fill_cache,
    load_image,
    read_triples,
    scan_images,
    text_key,
)
from iap_rt.train.models import Frozen

VAE_CHUNK = 8  # images per VAE call while caching
TEXT_CHUNK = 32  # captions per CLIP call while caching


@dataclass
class CachedSet:
    """Rows whose image latents and English embeddings are in the cache."""

    image_keys: list[str]  # per row: sha256 of the image file
    en_keys: list[str]  # per row: sha256 of the English caption
    zh_ids: torch.Tensor  # (N, S) int64 Chinese token ids
    zh_mask: torch.Tensor  # (N, S) int64 attention mask
    latents: ShardCache
    english: ShardCache
    empty_en: str  # key of the English embedding of ""
    empty_ids: torch.Tensor  # (S,) ids of the Chinese ""
    empty_mask: torch.Tensor  # (S,)

    def __len__(self) -> int:
        return len(self.image_keys)


@dataclass
class DataReport:
    rows: int = 0
    usable: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    val_rows: int = 0
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
class Plan:
    """What :func:`plan_sets` found: usable rows, cache directories, images to encode."""

    latents: ShardCache
    english: ShardCache
    train_rows: list[tuple[Triple, str]]  # (triple, image key)
    val_rows: list[tuple[Triple, str]]
    key_to_path: dict[str, Path]  # image key -> a file with that content
    report: DataReport


def plan_sets(cfg: TrainConfig, triples: list[Triple], val_triples: list[Triple] | None) -> Plan:
    """Hash and check every image, split off validation rows; loads no model, writes nothing."""
    lat_dir, en_dir = cache_dirs(cfg)
    latents, english = ShardCache(lat_dir), ShardCache(en_dir)
    scan = scan_images(triples, cfg.resolution, latents)
    check_bad(scan, len(triples), cfg.max_bad_fraction, Path(cfg.data))
    rep = DataReport(len(triples), len(scan.triples), len(scan.bad), cache_dir=str(lat_dir.parent))
    rep.bad_examples = [f"{t.image.name} (row {t.row}): {why}" for t, why in scan.bad[:10]]
    rows = list(zip(scan.triples, scan.image_keys))
    if val_triples is not None:
        vscan = scan_images(val_triples, cfg.resolution, latents)
        check_bad(vscan, len(val_triples), cfg.max_bad_fraction, Path(cfg.val_data))
        train_rows, val_rows = rows, list(zip(vscan.triples, vscan.image_keys))
        key_to_path = {**scan.key_to_path, **vscan.key_to_path}
    else:
        train_rows, val_rows = _hold_out(rows, cfg.val_count, cfg.seed)
        key_to_path = scan.key_to_path
    rep.val_rows = len(val_rows)
    return Plan(latents, english, train_rows, val_rows, key_to_path, rep)


def build_sets(
    plan: Plan,
    cfg: TrainConfig,
    frozen: Frozen,
    tok: PromptTokenizer,
    device,
    is_main: bool = True,
    wait=lambda: None,
) -> tuple[CachedSet, CachedSet | None]:
    """Encode what the cache lacks (main process), then the train and validation sets."""
    latents, english, rep = plan.latents, plan.english, plan.report
    if is_main:
        rep.latents_encoded = fill_cache(
            latents, plan.key_to_path, lambda ps: _encode_images(frozen, ps, cfg, device), VAE_CHUNK
        )
        texts = {text_key(t.en): t.en for t, _ in plan.train_rows + plan.val_rows}
        texts[text_key("")] = ""
        rep.english_encoded = fill_cache(
            english, texts, lambda ts: _encode_texts(frozen, ts, device), TEXT_CHUNK
        )
    wait()
    if not is_main:
        latents, english = ShardCache(latents.root), ShardCache(english.root)
    empty = tok([""])
    common = dict(
        latents=latents,
        english=english,
        empty_en=text_key(""),
        empty_ids=torch.from_numpy(empty.input_ids[0]),
        empty_mask=torch.from_numpy(empty.attention_mask[0]),
    )
    train = _cached_set(plan.train_rows, tok, common)
    val = _cached_set(plan.val_rows, tok, common) if plan.val_rows else None
    return train, val


def _hold_out(rows: list, count: int, seed: int) -> tuple[list, list]:
    if count == 0:
        return rows, []
    if count >= len(rows):
        raise InputError(
            f"val_count {count} leaves no training rows ({len(rows)} usable rows)",
            fix="lower val_count or pass a separate val_data file.",
        )
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[-count:])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _cached_set(rows: list, tok: PromptTokenizer, common: dict) -> CachedSet:
    enc = tok([t.zh for t, _ in rows])
    return CachedSet(
        image_keys=[k for _, k in rows],
        en_keys=[text_key(t.en) for t, _ in rows],
        zh_ids=torch.from_numpy(enc.input_ids),
        zh_mask=torch.from_numpy(enc.attention_mask),
        **common,
    )


@torch.no_grad()
def _encode_images(frozen: Frozen, paths: list[Path], cfg: TrainConfig, device) -> torch.Tensor:
    vae = frozen.vae
    x = torch.stack([load_image(p, cfg.resolution) for p in paths])  # (n, 3, R, R)
    dist = vae.encode(x.to(device, vae.dtype)).latent_dist
    return torch.stack([dist.mean, dist.std], dim=1)  # (n, 2, C, R/8, R/8)


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


def make_batch(
    ds: CachedSet, idx: list[int], g: torch.Generator, frozen: Frozen, dropout: float
) -> dict:
    """One micro-batch on the CPU: latents sampled from the cached posterior, noised."""
    vae, sched = frozen.vae.config, frozen.scheduler
    b = len(idx)
    drop = (torch.rand(b, generator=g) < dropout).tolist()  # caption dropout, both sides
    mom = torch.stack([ds.latents.get(ds.image_keys[i]) for i in idx])  # (B, 2, C, h, w)
    z = mom[:, 0] + mom[:, 1] * torch.randn(mom[:, 0].shape, generator=g)  # (B, C, h, w)
    z = (z - (getattr(vae, "shift_factor", None) or 0.0)) * vae.scaling_factor
    noise = torch.randn(z.shape, generator=g)  # (B, C, h, w)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g)  # (B,)
    keys = [ds.empty_en if d else ds.en_keys[i] for i, d in zip(idx, drop)]
    dm = torch.tensor(drop)[:, None]  # (B, 1)
    return {
        "latents": z,
        "noise": noise,
        "t": t,
        "x_t": sched.add_noise(z, noise, t),  # (B, C, h, w)
        "en": torch.stack([ds.english.get(k) for k in keys]),  # (B, S_en, D)
        "zh_ids": torch.where(dm, ds.empty_ids, ds.zh_ids[idx]),  # (B, S_zh)
        "zh_mask": torch.where(dm, ds.empty_mask, ds.zh_mask[idx]),  # (B, S_zh)
    }


def batch_to(batch: dict, device, dtype) -> dict:
    """Move a batch to ``device``; float tensors to ``dtype`` (the frozen models' dtype)."""
    return {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()
    }


def read_sets(cfg: TrainConfig) -> tuple[list[Triple], list[Triple] | None]:
    """Parse --data (and val_data) up front, before any model is loaded."""
    return read_triples(cfg.data), (read_triples(cfg.val_data) if cfg.val_data else None)
