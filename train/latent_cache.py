"""Images and the on-disk cache of everything frozen (VAE latents, English CLIP embeddings).

Images (:mod:`~iap_rt.train.rows` says where they come from) are resized (shorter side) and
centre cropped to the resolution. The frozen parts of every step are computed once and
cached as safetensors shards::

    CACHE/latents-<vae fingerprint>-r<resolution>/shard-*.safetensors
        <sha256 of image bytes> -> (2, C, h, w)  VAE posterior mean and std
    CACHE/latents-.../bad-*.json                 images that failed to decode: key -> reason
    CACHE/english-<text encoder fingerprint>/shard-*.safetensors
        <sha256 of caption>     -> (S, D)        English CLIP last hidden state

so later epochs and later runs skip the VAE and the CLIP encoder. Several processes build one
cache together: rank ``r`` of ``n`` encodes the missing keys with ``key mod n == r``
(:func:`owner`), each rank writes whole shards named by the hash of their keys, each atomically,
so no file is ever written by two ranks and there is nothing to merge but a directory listing
(:meth:`ShardCache.rescan` after a barrier). A killed build loses at most the shards in
progress; rerunning continues it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from iap_rt.errors import ArtifactNotFoundError, InputError
from iap_rt.fileio import atomic_path, ensure_dir, write_json_atomic
from iap_rt.train.rows import Rows

log = logging.getLogger("iap_rt.train")
SHARD_SIZE = 256  # entries per shard
OPEN_SHARDS = 64  # shard files kept open for reading


def load_image(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image -> ``(3, R, R)`` float in [-1, 1]: shorter side resized to R, centre crop."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
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
    """A directory of safetensors shards holding ``key -> tensor`` (+ keys known to be bad)."""

    def __init__(self, root: Path):
        self.root = Path(root)  # created by the first write
        self._index: dict[str, Path] = {}
        self.bad: dict[str, str] = {}
        self._open: OrderedDict[Path, object] = OrderedDict()
        self._seen: set[Path] = set()
        self.rescan()

    def rescan(self) -> None:
        """Index the shards (and bad lists) written since the last scan, by any process."""
        from safetensors import safe_open

        if not self.root.is_dir():
            return
        for f in sorted(self.root.glob("shard-*.safetensors")):
            if f not in self._seen:
                with safe_open(str(f), "pt") as h:
                    self._index.update(dict.fromkeys(h.keys(), f))
                self._seen.add(f)
        for f in sorted(self.root.glob("bad-*.json")):
            if f not in self._seen:
                self.bad.update(json.loads(f.read_text("utf-8")))
                self._seen.add(f)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self._index[key]
        if f in self._open:
            self._open.move_to_end(f)
        else:
            if len(self._open) >= OPEN_SHARDS:
                self._open.popitem(last=False)
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
        self._seen.add(path)
        return path

    def write_bad(self, bad: dict[str, str]) -> None:
        name = hashlib.sha256("\n".join(sorted(bad)).encode()).hexdigest()[:20]
        path = write_json_atomic(ensure_dir(self.root) / f"bad-{name}.json", bad)
        self.bad.update(bad)
        self._seen.add(path)


def owner(key: str, world: int) -> int:
    """The rank that encodes cache entry ``key`` (a hex digest: uniform over the ranks)."""
    return int(key[:12], 16) % world


def fill_cache(
    cache: ShardCache,
    todo: dict[str, object],
    encode: Callable[[list], list[torch.Tensor | str]],
    chunk: int,
    rank: int = 0,
    world: int = 1,
    what: str = "items",
    progress: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Encode this rank's share (:func:`owner`) of the ``key -> input`` items missing from
    ``cache``.

    ``encode`` returns, per input, a tensor or the reason it failed (a string: the key is
    recorded as bad). Shows a progress bar with the rate and ETA on ``progress``; checks
    ``stop()`` between chunks (what is written stays). Returns how many items this rank did
    (encoded or found bad)."""
    from tqdm import tqdm

    keys = sorted(
        k for k in todo if owner(k, world) == rank and k not in cache and k not in cache.bad
    )
    if not keys:
        return 0
    pending: dict[str, torch.Tensor] = {}
    bad: dict[str, str] = {}
    share = f" (rank {rank}'s 1/{world})" if world > 1 else ""
    bar = tqdm(
        total=len(keys),
        desc=f"cache {what}{share}",
        unit=what.split()[0],
        disable=not progress,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
        dynamic_ncols=True,
    )
    done = 0
    try:
        for i in range(0, len(keys), chunk):
            if stop():
                break
            part = keys[i : i + chunk]
            for k, out in zip(part, encode([todo[k] for k in part])):
                if isinstance(out, str):
                    bad[k] = out
                else:
                    pending[k] = out.float().cpu()
            if len(pending) >= SHARD_SIZE:
                cache.write_shard(pending)
                pending = {}
            done += len(part)
            bar.update(len(part))
    finally:
        if pending:
            cache.write_shard(pending)
        if bad:
            cache.write_bad(bad)
        bar.close()
    return done


def await_entries(cache: ShardCache, expected: int, timeout: float = 120.0) -> None:
    """Rescan until ``cache`` holds ``expected`` entries (good + bad): what every rank wrote.
    A network filesystem may list another machine's new files only after a while."""
    deadline = time.monotonic() + timeout
    while True:
        cache.rescan()
        if len(cache) + len(cache.bad) >= expected:
            return
        if time.monotonic() > deadline:
            raise ArtifactNotFoundError(
                f"the cache {cache.root} holds {len(cache) + len(cache.bad)} entries after "
                f"{timeout:.0f}s, but the processes wrote {expected} in all",
                fix="put --cache-dir (and --out) on a filesystem every machine shares.",
            )
        time.sleep(1.0)


def check_bad(rows: Rows, scan, max_fraction: float, quiet: bool = False) -> None:
    """Raise when no row is usable or more than ``max_fraction`` of rows are bad."""
    total, nbad = len(rows), len(rows) - len(scan.usable)
    bad_rows = np.flatnonzero(np.isin(rows.image, np.fromiter(scan.bad, np.int64)))[:5]
    why = [f"{rows.where(r)}: {scan.bad[int(rows.image[r])]}" for r in bad_rows]
    if not quiet:
        for w in why:
            log.warning("skipping %s", w)
    examples = "; ".join(why[:3])
    if not len(scan.usable):
        raise InputError(
            f"{rows.path} has zero usable rows: all {total} image(s) are missing or corrupt "
            f"(e.g. {examples})",
            fix="check the image paths (they are relative to the data file).",
        )
    frac = nbad / total
    if frac > max_fraction:
        raise InputError(
            f"{nbad} of {total} rows of {rows.path} ({frac:.0%}) have missing or corrupt "
            f"images, more than max_bad_fraction={max_fraction} (e.g. {examples})",
            fix="fix or remove those rows, or raise --max-bad-fraction.",
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
