"""Atomic file writes and hashing: a killed process never leaves a half file that looks whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from iap_rt.errors import OutputError


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(
            f"cannot write {path}: {e.strerror or e}",
            fix="choose a writable output location with enough free space.",
        ) from e
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True))


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) or raise :class:`OutputError` saying why not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(
            f"output directory {path} exists and is a file",
            fix="remove the file or choose another output directory.",
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot create directory {path}: {e.strerror or e}",
            fix="choose an output directory you can write to.",
        ) from e
    if not os.access(path, os.W_OK):
        raise OutputError(
            f"directory {path} is not writable", fix="choose an output directory you can write to."
        )
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dir_mode(final: Path) -> int:
    """The existing directory's permissions, else what the umask gives a new one."""
    if final.is_dir():
        return final.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A fresh temp directory beside ``final`` that is removed on failure. It has ``final``'s
    permissions (or what the umask gives a new directory), not mkdtemp's 0700, so renaming it
    onto ``final`` keeps who may read the result."""
    final = Path(final)
    ensure_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        os.chmod(tmp, _dir_mode(final))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


def leftovers(final: str | os.PathLike) -> list[Path]:
    """Directories a killed writer of ``final`` left beside it: ``.<name>.<random>`` staging
    and ``.<name>.old-<random>`` swap-outs (exactly what :func:`staging_dir` / :func:`swap_in`
    name: mkdtemp's 8 characters of [a-z0-9_], so "a" never matches those of "a.b")."""
    final = Path(final)
    ours = re.compile(rf"\.{re.escape(final.name)}\.(old-)?[a-z0-9_]{{8}}")
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return []
    return sorted(
        p for p in entries if ours.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    )


def _try_flock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def lock_holder(final: str | os.PathLike) -> str | None:
    """The pid written in ``final``'s lock file while a writer holds it, else None."""
    lock = _lock_path(Path(final))
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_flock(fd):
            return None
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    except ImportError:  # pragma: no cover - not POSIX
        return None
    finally:
        os.close(fd)


def remove_leftovers(final: str | os.PathLike) -> list[Path]:
    """Remove what a killed writer left beside ``final`` when no writer holds its lock; return
    what was removed. Creates nothing when there are no leftovers (a read-only parent, e.g.
    site-packages, is never touched), and removes nothing while a writer runs."""
    found = leftovers(final)
    if not found:
        return []
    lock = _lock_path(Path(final))
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return []
    try:
        if not _try_flock(fd):
            return []  # a live writer: its staging directory is in use
        found = leftovers(final)  # re-read under the lock
        for p in found:
            shutil.rmtree(p, ignore_errors=True)
        return [p for p in found if not p.exists()]
    except ImportError:  # pragma: no cover - not POSIX
        return []
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(final: str | os.PathLike, what: str = "iap-rt export") -> Iterator[Path]:
    """Hold ``.<name>.lock`` beside ``final`` for the duration; refuse when another process
    holds it. Once held, :func:`leftovers` of killed runs are removed: nobody else can be
    using them.

    The lock is an ``flock`` on the lock file, released by the kernel when its process exits,
    so a killed writer never leaves a stale lock behind (the empty lock file stays). Without
    ``fcntl`` (Windows) there is no lock and no clean-up."""
    final = Path(final)
    ensure_dir(final.parent)
    lock = _lock_path(final)
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - not POSIX
        yield lock
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_flock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise OutputError(
                f"another {what} (pid {holder}) is writing {final}",
                fix="wait for it to finish, or stop it (its lock goes with its process).",
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        for p in leftovers(final):
            shutil.rmtree(p, ignore_errors=True)
        yield lock
    finally:
        os.close(fd)  # releases the flock


def swap_in(stage: str | os.PathLike, out: str | os.PathLike) -> None:
    """Replace the directory ``out`` by ``stage`` (two renames; the old one is removed after).

    ``stage`` must be on the same file system, e.g. made by :func:`staging_dir`. If the second
    rename fails the old directory is put back."""
    stage, out = Path(stage), Path(out)
    if not out.exists():
        os.rename(stage, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old)  # onto the empty directory mkdtemp made
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
