"""Training data: (image, Chinese caption, English caption) triples and their on-disk cache.

``--data`` is JSONL (one ``{"image", "zh", "en"}`` object a line) or CSV with those columns;
image paths are relative to the data file. Images are resized (shorter side) and centre
cropped to the resolution; missing or corrupt images are skipped and counted.

The frozen parts of every step are computed once and cached as safetensors shards:

    CACHE/latents-<vae fingerprint>-r<resolution>/shard-*.safetensors
        <sha256 of image bytes> -> (2, C, h, w)  VAE posterior mean and std
    CACHE/english-<text encoder fingerprint>/shard-*.safetensors
        <sha256 of caption>     -> (S, D)        English CLIP last hidden state

so later epochs and later runs skip the VAE and the CLIP encoder. A shard is written
atomically once complete; a killed cache build loses at most the shard in progress.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from iap_rt.errors import ArtifactNotFoundError, InputError
from iap_rt.fileio import atomic_path, ensure_dir

log = logging.getLogger("iap_rt.train")
COLUMNS = ("image", "zh", "en")
SHARD_SIZE = 256  # entries per shard


@dataclass(frozen=True)
class Triple:
    image: Path  # absolute path
    zh: str
    en: str
    row: int  # 1-based line (JSONL) or data row (CSV) in the data file


def read_triples(path: str | Path) -> list[Triple]:
    """Parse a JSONL/CSV data file; raise :class:`InputError` naming the file, row and column."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(
            f"data file {path} does not exist", fix="pass --data a JSONL or CSV file."
        )
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise InputError(f"data file {path}: unknown format {suffix!r}; expected .jsonl or .csv")
    try:
        text = path.read_text("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"data file {path} is not UTF-8 text", fix="save it as UTF-8.") from e
    rows = _jsonl_rows(path, text) if suffix != ".csv" else _csv_rows(path, text)
    triples = []
    for row, rec in rows:
        for col in COLUMNS:
            if col not in rec or rec[col] is None:
                raise InputError(
                    f"{path} row {row} has no {col!r} column (found {sorted(rec)})",
                    fix=f"give every row the columns {', '.join(COLUMNS)}.",
                )
            if not isinstance(rec[col], str):
                raise InputError(f"{path} row {row}: {col!r} must be a string, got {rec[col]!r}")
        triples.append(Triple((path.parent / rec["image"]).resolve(), rec["zh"], rec["en"], row))
    if not triples:
        raise InputError(
            f"data file {path} has zero rows",
            fix=f"add rows with the columns {', '.join(COLUMNS)}.",
        )
    return triples


def _jsonl_rows(path: Path, text: str) -> Iterable[tuple[int, dict]]:
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {i} is not valid JSON: {e.msg}") from e
        if not isinstance(rec, dict):
            raise InputError(f"{path} line {i} is not a JSON object")
        yield i, rec


def _csv_rows(path: Path, text: str) -> Iterable[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(
            f"{path} has no {', '.join(repr(m) for m in missing)} column(s) in its header "
            f"(found {reader.fieldnames})",
            fix=f"the first line must name the columns {','.join(COLUMNS)}.",
        )
    yield from enumerate(reader, start=1)


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Image file -> ``(3, R, R)`` float in [-1, 1]: shorter side resized to R, centre crop."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (R, R, 3) in [0, 255]
    return (x / 127.5 - 1.0).permute(2, 0, 1).contiguous()  # (3, R, R)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ShardCache:
    """A directory of safetensors shards holding ``key -> tensor``."""

    def __init__(self, root: Path):
        from safetensors import safe_open

        self.root = Path(root)  # created by the first write_shard
        self._index: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        for f in sorted(self.root.glob("shard-*.safetensors")) if self.root.is_dir() else ():
            with safe_open(str(f), "pt") as h:
                self._index.update(dict.fromkeys(h.keys(), f))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self._index[key]
        if f not in self._open:
            self._open[f] = safe_open(str(f), "pt")
        return self._open[f].get_tensor(key)

    def write_shard(self, tensors: dict[str, torch.Tensor]) -> Path:
        """Write one shard atomically (its name is a hash of its keys)."""
        from safetensors.torch import save_file

        name = hashlib.sha256("\n".join(sorted(tensors)).encode()).hexdigest()[:20]
        path = ensure_dir(self.root) / f"shard-{name}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        self._index.update(dict.fromkeys(tensors, path))
        return path


def fill_cache(
    cache: ShardCache, items: dict[str, object], encode: Callable[[list], torch.Tensor], chunk: int
) -> int:
    """Encode the ``key -> input`` items missing from ``cache`` in chunks; return how many."""
    todo = [(k, v) for k, v in items.items() if k not in cache]
    pending: dict[str, torch.Tensor] = {}
    for i in range(0, len(todo), chunk):
        part = todo[i : i + chunk]
        out = encode([v for _, v in part])  # (n, ...)
        pending.update({k: t.float().cpu() for (k, _), t in zip(part, out)})
        if len(pending) >= SHARD_SIZE:
            cache.write_shard(pending)
            pending = {}
    if pending:
        cache.write_shard(pending)
    return len(todo)


@dataclass
class ScanResult:
    """Usable triples with their image keys, and the bad rows (reason per row)."""

    triples: list[Triple] = field(default_factory=list)
    image_keys: list[str] = field(default_factory=list)
    bad: list[tuple[Triple, str]] = field(default_factory=list)
    key_to_path: dict[str, Path] = field(default_factory=dict)


def scan_images(triples: list[Triple], resolution: int, cache: ShardCache) -> ScanResult:
    """Hash every image; decode those not yet cached to find corrupt ones."""
    res, seen = ScanResult(), {}
    for t in triples:
        if t.image not in seen:
            seen[t.image] = _check_image(t.image, resolution, cache)
        key, reason = seen[t.image]
        if reason:
            res.bad.append((t, reason))
            continue
        res.triples.append(t)
        res.image_keys.append(key)
        res.key_to_path.setdefault(key, t.image)
    return res


def _check_image(path: Path, resolution: int, cache: ShardCache) -> tuple[str, str | None]:
    try:
        key = sha256_bytes(path.read_bytes())
    except OSError as e:
        return "", f"cannot read: {e.strerror or e}"
    if key not in cache:
        try:
            load_image(path, resolution)
        except Exception as e:  # PIL raises many types for broken files
            return key, f"not a readable image: {type(e).__name__}: {e}"
    return key, None


def check_bad(scan: ScanResult, total: int, max_fraction: float, source: Path) -> None:
    """Raise when no row is usable or more than ``max_fraction`` of rows are bad."""
    for t, why in scan.bad[:5]:
        log.warning("skipping %s row %d (%s): %s", source.name, t.row, t.image, why)
    examples = "; ".join(f"row {t.row} {t.image.name}: {why}" for t, why in scan.bad[:3])
    if not scan.triples:
        raise InputError(
            f"{source} has zero usable rows: all {total} image(s) are missing or corrupt "
            f"(e.g. {examples})",
            fix="check the image paths (they are relative to the data file).",
        )
    frac = len(scan.bad) / total
    if frac > max_fraction:
        raise InputError(
            f"{len(scan.bad)} of {total} rows of {source} ({frac:.0%}) have missing or corrupt "
            f"images, more than max_bad_fraction={max_fraction} (e.g. {examples})",
            fix="fix or remove those rows, or raise max_bad_fraction in [train].",
        )


def dir_fingerprint(path: Path, patterns: tuple[str, ...]) -> str:
    """sha256 over the names and bytes of the files in ``path`` matching ``patterns``."""
    h = hashlib.sha256()
    files = sorted({f for p in patterns for f in path.glob(p) if f.is_file()})
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:16]
