"""Which images the rows use, their cache keys (sha256 of the bytes) and which are unusable.

Hashing means reading every image, so it is done once per image, not once per start and rank:

- ``CACHE/image-keys.parquet`` remembers ``id, size, mtime_ns -> key`` (and a reason when the
  image did not open); an image whose id (path, or ``file.parquet#row``), size and mtime
  still match reuses its key after a ``stat`` (like make/rsync: an edit that keeps both is not
  seen). Rank 0 rewrites it atomically once the rows passed their checks; two jobs racing on
  one cache only cost each other a re-hash later.
- the images not yet known are hashed by all ranks together, rank ``r`` every ``r``-th, and
  the results are gathered (``gather``: ``all_gather_object``).

An image is checked by opening its header only; decoding is the cache build's job.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iap_rt.train.latent_cache import ShardCache, sha256_bytes
from iap_rt.train.rows import Rows

INDEX = "image-keys.parquet"


@dataclass
class ScanResult:
    """Each used image's cache key, the images that are unusable (why), the usable rows."""

    keys: dict[int, str] = field(default_factory=dict)  # image index -> sha256 of its bytes
    bad: dict[int, str] = field(default_factory=dict)  # image index -> reason
    usable: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # row ids
    hashed: int = 0  # images read and hashed by all ranks this time

    def refresh(self, rows: Rows, cache: ShardCache) -> None:
        """Mark images the cache build found undecodable as bad; recompute usable rows."""
        for i, key in self.keys.items():
            if key in cache.bad and i not in self.bad:
                self.bad[i] = cache.bad[key]
        self.usable = _usable(rows, self.bad)


class ImageIndex:
    """``CACHE/image-keys.parquet``: the keys of images hashed before."""

    def __init__(self, root: Path):
        self.path = Path(root) / INDEX
        self.table, self.changed = None, False
        if self.path.is_file():
            import pyarrow.parquet as pq

            try:
                self.table = pq.read_table(self.path)
            except Exception:  # a damaged index is only a lost shortcut
                self.table = None

    def lookup(self, ids: list[str], sizes: np.ndarray, mtimes: np.ndarray) -> list:
        """Per id: ``(key, bad reason)`` if known with this size and mtime, else None."""
        if self.table is None or not ids:
            return [None] * len(ids)
        import pyarrow as pa
        import pyarrow.compute as pc

        at = pc.index_in(pa.array(ids, pa.string()), value_set=self.table.column("id"))
        found = at.is_valid().to_numpy(zero_copy_only=False)
        rows = at.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        same = found & (self.table.column("size").to_numpy()[rows] == sizes)
        same &= self.table.column("mtime_ns").to_numpy()[rows] == mtimes
        keys, bad = self.table.column("key"), self.table.column("bad")
        return [
            (keys[int(r)].as_py(), bad[int(r)].as_py() or None) if ok else None
            for r, ok in zip(rows, same)
        ]

    def add(self, entries: list[tuple[str, int, int, str, str]]) -> None:
        """Merge ``(id, size, mtime_ns, key, bad)`` entries in (in memory; :meth:`save`
        writes). Every rank merges the same entries, so their lookups agree."""
        if not entries:
            return
        import pyarrow as pa

        cols = list(zip(*entries))
        new = pa.table(
            {
                "id": pa.array(cols[0], pa.string()),
                "size": pa.array(cols[1], pa.int64()),
                "mtime_ns": pa.array(cols[2], pa.int64()),
                "key": pa.array(cols[3], pa.string()),
                "bad": pa.array(cols[4], pa.string()),
            }
        )
        table = new
        if self.table is not None:
            import pyarrow.compute as pc

            old = self.table.filter(pc.invert(pc.is_in(self.table.column("id"), new.column("id"))))
            table = pa.concat_tables([old.select(new.column_names).cast(new.schema), new])
        self.table, self.changed = table, True

    def save(self) -> None:
        """Write the index atomically if entries were added."""
        if not self.changed:
            return
        import pyarrow.parquet as pq

        from iap_rt.fileio import atomic_path, ensure_dir

        ensure_dir(self.path.parent)
        with atomic_path(self.path) as tmp:
            pq.write_table(self.table, tmp)
        self.changed = False


def scan_images(
    rows: Rows,
    cache: ShardCache,
    index: ImageIndex,
    progress: bool = False,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[list], list[list]] = lambda x: [x],
) -> ScanResult:
    """The key of every image the rows use (from the index, else hashed by the ranks
    together) and the images that cannot be used; new keys go into ``index`` in memory."""
    from tqdm import tqdm

    res = ScanResult()
    used = np.unique(rows.image).tolist()
    idents: dict[int, tuple[str, int, int]] = {}
    for i in used:
        try:
            idents[i] = rows.images.ident(i)
        except OSError as e:
            res.bad[i] = f"cannot read: {e.strerror or e}"
    known = list(idents)
    ids = [idents[i][0] for i in known]
    sizes = np.array([idents[i][1] for i in known], np.int64)
    mtimes = np.array([idents[i][2] for i in known], np.int64)
    todo = []
    for i, hit in zip(known, index.lookup(ids, sizes, mtimes)):
        if hit is None:
            todo.append(i)
        else:
            res.keys[i] = hit[0]
            if hit[1]:
                res.bad[i] = hit[1]
    mine = todo[rank::world]
    bar = tqdm(
        mine,
        desc="hash images" + (f" (rank {rank}'s 1/{world})" if world > 1 else ""),
        unit="img",
        disable=not progress or len(mine) < 1000,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    done = []
    for i in bar:
        try:
            data = rows.images.read(i)
        except OSError as e:
            done.append((i, "", f"cannot read: {e.strerror or e}"))
            continue
        key = sha256_bytes(data)
        done.append((i, key, None if key in cache else _header_problem(data)))
    entries = []
    for part in gather(done):
        for i, key, why in part:
            res.hashed += 1
            if why:
                res.bad[i] = why
            if key:
                res.keys[i] = key
                entries.append((*idents[i], key, why or ""))
    for i, key in res.keys.items():
        if key in cache.bad:
            res.bad[i] = cache.bad[key]
    index.add(entries)
    res.usable = _usable(rows, res.bad)
    return res


def _header_problem(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.size  # noqa: B018 - parsing the header is the check
    except Exception as e:  # PIL raises many types for broken files
        return f"not a readable image: {type(e).__name__}: {e}"
    return None


def _usable(rows: Rows, bad: dict[int, str]) -> np.ndarray:
    if not bad:
        return np.arange(len(rows), dtype=np.int64)
    return np.flatnonzero(~np.isin(rows.image, np.fromiter(bad, np.int64, len(bad))))


def gather_objects(world: int) -> Callable[[list], list[list]]:
    """``all_gather_object`` over the job's process group (identity for one process)."""
    if world == 1:
        return lambda x: [x]

    def gather(x: list) -> list[list]:
        import torch.distributed as dist

        out: list = [None] * world
        dist.all_gather_object(out, x)
        return out

    return gather
