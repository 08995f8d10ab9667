"""Reading a data file of (image, Chinese caption, English caption) rows into compact columns.

``--data`` is JSONL (one ``{"image", "zh", "en"}`` object a line), CSV with those columns, or
Parquet with ``image`` (a path string, image bytes, or a Hugging Face ``datasets`` image
struct with ``bytes``), ``zh`` and ``en`` columns. Image paths are relative to the data file.

A million rows must index in seconds and in a few hundred MB, so :class:`Rows` holds columns,
not objects: captions as one UTF-8 buffer + offsets (:class:`TextColumn`), each row's image as
an index into an :class:`ImageSource` (the distinct paths of the file, or the Parquet rows
holding bytes), line numbers as an int32 array. Files are read as streams (JSONL/CSV line by
line, Parquet in record batches), never whole into memory.
"""

from __future__ import annotations

import csv
import json
import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iap_rt.errors import ArtifactNotFoundError, InputError

COLUMNS = ("image", "zh", "en")
FORMATS = (".jsonl", ".json", ".csv", ".parquet")


class TextColumn:
    """Append-only strings in one UTF-8 buffer; ``col[i]`` decodes row ``i``."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._off = array("q", [0])

    def append(self, text: str) -> None:
        self._buf += text.encode("utf-8")
        self._off.append(len(self._buf))

    def __len__(self) -> int:
        return len(self._off) - 1

    def __getitem__(self, i: int) -> str:
        return self._buf[self._off[i] : self._off[i + 1]].decode("utf-8")

    @property
    def nbytes(self) -> int:
        return len(self._buf) + self._off.itemsize * len(self._off)


class ImageSource:
    """Where the images of a data file are: ``read(i)`` -> the bytes of image ``i``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> bytes:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def ident(self, i: int) -> tuple[str, int, int]:
        """(stable id, size, mtime_ns) of image ``i``: its key is reused while these hold."""
        raise NotImplementedError


class PathImages(ImageSource):
    """Image files (each distinct path once)."""

    def __init__(self, paths: list[str]):
        self.paths = paths  # absolute, normalised

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def name(self, i: int) -> str:
        return self.paths[i]

    def ident(self, i: int) -> tuple[str, int, int]:
        st = os.stat(self.paths[i])
        return self.paths[i], st.st_size, st.st_mtime_ns


class ParquetImages(ImageSource):
    """Image bytes stored in a Parquet column (image ``i`` = row ``i``); one row group is held
    in memory at a time, so read in row order."""

    def __init__(self, path: Path, column: str, struct: bool):
        import pyarrow.parquet as pq

        self.path, self.column, self.struct = path, column, struct
        self._file = pq.ParquetFile(path)
        meta = self._file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.cumsum([0, *sizes])
        self._group, self._values = -1, None
        self._stat = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, i: int) -> bytes:
        g = int(np.searchsorted(self._starts, i, side="right")) - 1
        if g != self._group:
            col = self._file.read_row_group(g, columns=[self.column]).column(0)
            if self.struct:
                col = col.combine_chunks().field("bytes")
            self._group, self._values = g, col
        value = self._values[i - int(self._starts[g])].as_py()
        if value is None:
            raise OSError("the row has no image bytes")
        return value

    def name(self, i: int) -> str:
        return f"{self.path.name} row {i + 1}"

    def ident(self, i: int) -> tuple[str, int, int]:
        if self._stat is None:
            self._stat = os.stat(self.path)
        return f"{os.path.abspath(self.path)}#{i}", self._stat.st_size, self._stat.st_mtime_ns


@dataclass
class Rows:
    """The rows of one data file, as columns."""

    path: Path  # the data file
    images: ImageSource
    image: np.ndarray  # (N,) int32: each row's image in ``images``
    zh: TextColumn
    en: TextColumn
    line: np.ndarray  # (N,) int32: 1-based line (JSONL) or data row (CSV, Parquet)

    def __len__(self) -> int:
        return len(self.image)

    def where(self, i: int) -> str:
        """``data.jsonl row 12 (cat.png)`` for messages."""
        return f"{self.path.name} row {int(self.line[i])} ({self.images.name(int(self.image[i]))})"


def read_rows(path: str | os.PathLike) -> Rows:
    """Parse a data file; raise :class:`InputError` naming the file, row and column."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(
            f"data file {path} does not exist", fix="pass --data a JSONL, CSV or Parquet file."
        )
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(
            f"data file {path}: unknown format {suffix!r}; expected .jsonl, .csv or .parquet",
            fix="name the file after its format (.jsonl, .csv or .parquet).",
        )
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                recs = _jsonl(path, f) if suffix != ".csv" else _csv(path, f)
                rows = _collect(path, recs)
        except UnicodeDecodeError as e:
            raise InputError(f"data file {path} is not UTF-8 text", fix="save it as UTF-8.") from e
    if not len(rows):
        raise InputError(
            f"data file {path} has zero rows",
            fix=f"add rows with the columns {', '.join(COLUMNS)}.",
        )
    return rows


def _collect(path: Path, recs: Iterable[tuple[int, dict]]) -> Rows:
    """Records -> columns; image paths interned (each distinct path stored once)."""
    ids: dict[str, int] = {}
    image, line = array("i"), array("i")
    zh, en = TextColumn(), TextColumn()
    for row, rec in recs:
        for col in COLUMNS:
            value = rec.get(col)
            if value is None:
                raise InputError(
                    f"{path} row {row} has no {col!r} column (found {sorted(rec)})",
                    fix=f"give every row the columns {', '.join(COLUMNS)}.",
                )
            if not isinstance(value, str):
                raise InputError(
                    f"{path} row {row}: {col!r} must be a string, got {value!r}",
                    fix=f"write {col!r} as a JSON string.",
                )
            if "\x00" in value or not _encodable(value):
                raise InputError(
                    f"{path} row {row}: {col!r} holds a NUL character or a lone UTF-16 "
                    f"surrogate ({value[:40]!r})",
                    fix=f"write {col!r} as valid Unicode text without control characters.",
                )
        image.append(ids.setdefault(rec["image"], len(ids)))
        zh.append(rec["zh"])
        en.append(rec["en"])
        line.append(row)
    base = os.path.abspath(path.parent)
    paths = [os.path.normpath(os.path.join(base, p)) for p in ids]  # no syscalls per path
    return Rows(path, PathImages(paths), _np(image), zh, en, _np(line))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _np(a: array) -> np.ndarray:
    return np.frombuffer(a, dtype=np.int32).copy() if len(a) else np.zeros(0, np.int32)


def _jsonl(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path} line {i} is not valid JSON: {e.msg}", fix="one JSON object a line."
            ) from e
        except RecursionError as e:
            raise InputError(
                f"{path} line {i} nests JSON too deeply", fix="one flat JSON object a line."
            ) from e
        if not isinstance(rec, dict):
            raise InputError(f"{path} line {i} is not a JSON object", fix="one object a line.")
        yield i, rec


def _csv(path: Path, f) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise InputError(
            f"{path} has no {', '.join(repr(m) for m in missing)} column(s) in its header "
            f"(found {reader.fieldnames})",
            fix=f"the first line must name the columns {','.join(COLUMNS)}.",
        )
    try:
        yield from enumerate(reader, start=1)
    except csv.Error as e:  # e.g. a field past the csv module's 128 kB limit
        raise InputError(
            f"{path} line {reader.line_num} is not valid CSV: {e}",
            fix="quote fields that hold commas or newlines; keep each field under 128 kB.",
        ) from e


def _read_parquet(path: Path) -> Rows:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(
            f"reading {path} needs pyarrow", fix="pip install pyarrow (or 'iap-rt[train]')."
        ) from e
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path} is not a readable Parquet file: {e}") from e
    schema = pf.schema_arrow
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise InputError(
            f"{path} has no {', '.join(repr(m) for m in missing)} column(s) (found {schema.names})",
            fix=f"give the table the columns {', '.join(COLUMNS)}.",
        )
    kind = schema.field("image").type
    struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
    as_bytes = pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or struct
    if not as_bytes and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(
            f"{path}: column 'image' has type {kind}; expected a path string or image bytes",
            fix="store image paths (relative to the file) or the encoded image bytes.",
        )
    text_cols = ["zh", "en"] if as_bytes else ["image", "zh", "en"]
    for col in ("zh", "en"):
        t = schema.field(col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise InputError(f"{path}: column {col!r} has type {t}; expected strings")

    def records() -> Iterator[tuple[int, dict]]:
        row = 0
        for batch in pf.iter_batches(batch_size=65536, columns=text_cols):
            cols = {name: batch.column(name).to_pylist() for name in text_cols}
            for j in range(batch.num_rows):
                row += 1
                rec = {name: cols[name][j] for name in text_cols}
                if as_bytes:
                    rec["image"] = ""  # the bytes stay in the file until they are encoded
                yield row, rec

    rows = _collect(path, records())
    if as_bytes:
        rows.images = ParquetImages(path, "image", struct)
        rows.image = np.arange(len(rows), dtype=np.int32)
    return rows
