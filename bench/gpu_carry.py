"""How ``bench/gpu_check.sh`` gets onnxruntime-gpu and the project onto the GPU machine, which
no registry can reach and which takes 64 MiB per call, the working tree included (its header
and bench/README.md, "GPU check", say what to run):

    here (prepare):
      slim WHEEL DIR [--arch 90]       onnxruntime-gpu's wheel unpacked into DIR, less what the
                                       device never loads (prints what each step removed)
      prune SRC DST [--arch 90]        one CUDA library's fatbin cut to one architecture
      pack DIR ARCHIVE                 DIR as tar.xz (Python's lzma: no xz binary anywhere)
      split ARCHIVE CARRY CAP1,CAP2,.. one part per call (CAPn: bytes call n can carry) in
                                       CARRY/callN/, a MANIFEST.json beside each
    there:
      collect CALLDIR PARTS            this call's parts, each checked against the manifest
      assemble PARTS DEST              every part -> the archive (checked) -> unpacked in DEST
      install REPO SITE                the project into SITE, non-editable, by copying its
                                       packages as pyproject lays them out (no build backend)
    the dry run:
      devpython DIR                    a Python in DIR that sees this one's packages but not
                                       an editable install of the project (as on the device)

Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import tomllib

MiB = 1 << 20

# ---- CUDA fatbins ---------------------------------------------------------------------------
# A CUDA shared library keeps its device code in the ELF section .nv_fatbin: back-to-back
# containers, each a 16-byte header (magic 0xBA55ED50, version u16, header size u16, payload
# size u64) followed by entries, each a header (kind u16 (1 PTX, 2 ELF), version u16, header
# size u32, payload size u64, ..., architecture u32 at +28) and its (zstd-compressed) payload.
# Each container is registered by address (the __fatbinwrap records in .nvFatBinSegment), so
# containers must stay where they are: pruning keeps every container in place, moves the kept
# entries to its front, shrinks its payload size and zeroes the rest (which then compresses
# to nothing). nvprune does this for object files and static libraries only, not for shared
# objects, and no registry wheel carries it.
FATBIN_MAGIC = 0xBA55ED50


def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of section ``name`` of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):  # name, type, flags, addr, offset, size, ...
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)

    strtab = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        start = strtab + h[0]
        if bytes(data[start : data.index(b"\0", start)]).decode() == name:
            return h[4], h[5]
    raise ValueError(f"no section {name}")


def fatbin_entries(data, offset: int, size: int):
    """Yield (container offset, header size, payload size, [(entry offset, entry size, kind,
    arch)]) for every container of a .nv_fatbin section."""
    o, end = offset, offset + size
    while o < end:
        if data[o : o + 8] == bytes(8):  # what a pruned container left behind (zeros)
            o += 8
            continue
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", data, o)
        if magic != FATBIN_MAGIC:
            raise ValueError(f"no fatbin container at {o:#x}")
        e, entries = o + hsize, []
        while e < o + hsize + fsize:
            kind, _v, ehsize, psize = struct.unpack_from("<HHIQ", data, e)
            (arch,) = struct.unpack_from("<I", data, e + 28)
            entries.append((e, ehsize + psize, kind, arch))
            e += ehsize + psize
        if e != o + hsize + fsize:
            raise ValueError(f"fatbin container at {o:#x}: entries overrun its size")
        yield o, hsize, fsize, entries
        o += hsize + fsize


def prune_fatbin(data: bytes, arch: int) -> tuple[bytes, dict]:
    """``data`` (a CUDA shared library) with only ``arch``'s entries (sm_90 and sm_90a are both
    90) in every container that has one; containers without one are left as they are."""
    out = bytearray(data)
    offset, size = elf_section(out, ".nv_fatbin")
    stats = {"containers": 0, "kept": 0, "dropped": 0, "untouched": 0, "bytes_dropped": 0}
    for o, hsize, fsize, entries in list(fatbin_entries(out, offset, size)):
        stats["containers"] += 1
        kept = [(s, n) for s, n, _kind, a in entries if a == arch]
        if not kept:
            stats["untouched"] += len(entries)
            continue
        blob = b"".join(bytes(out[s : s + n]) for s, n in kept)
        out[o + hsize : o + hsize + fsize] = blob + bytes(fsize - len(blob))
        struct.pack_into("<Q", out, o + 8, len(blob))
        stats["kept"] += len(kept)
        stats["dropped"] += len(entries) - len(kept)
        stats["bytes_dropped"] += fsize - len(blob)
    return bytes(out), stats


def fatbin_arches(data) -> dict[int, int]:
    """{architecture: entries} of a library's .nv_fatbin."""
    offset, size = elf_section(data, ".nv_fatbin")
    count: dict[int, int] = {}
    for *_, entries in fatbin_entries(data, offset, size):
        for _s, _n, _k, arch in entries:
            count[arch] = count.get(arch, 0) + 1
    return count


# ---- here: the carried archive --------------------------------------------------------------
# what the device never loads: the TensorRT provider (no TensorRT there) and the C API library
# (the Python module links ONNX Runtime in; only C/C++ programs load libonnxruntime.so)
DROP = (
    "onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
    "onnxruntime/capi/libonnxruntime.so",
)
CUDA_LIB = "onnxruntime/capi/libonnxruntime_providers_cuda.so"


def slim(wheel: Path, dest: Path, arch: int) -> dict:
    """Unpack ``wheel`` into ``dest`` less :data:`DROP`, the CUDA provider cut to ``arch``."""
    shutil.rmtree(dest, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
    record = {"wheel_bytes": wheel.stat().st_size, "removed": {}}
    for path in sorted(dest.rglob("*")):
        rel = path.relative_to(dest).as_posix()
        if path.is_file() and any(rel.startswith(d) for d in DROP):
            record["removed"][rel] = path.stat().st_size
            path.unlink()
    lib = dest / CUDA_LIB
    before = lib.read_bytes()
    pruned, stats = prune_fatbin(before, arch)
    lib.write_bytes(pruned)
    record["cuda_provider"] = {"bytes": len(before), **stats, "arches_left": fatbin_arches(pruned)}
    record["unpacked_bytes"] = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return record


def pack(src: Path, archive: Path) -> int:
    """``src``'s files as a tar.xz (xz preset 9e, sorted names, no owners): its size."""
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=9 | 0x80000000) as tar:  # lzma.PRESET_EXTREME
        for path in sorted(src.rglob("*")):
            if path.is_file():
                info = tar.gettarinfo(path, path.relative_to(src).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    os.replace(tmp, archive)
    return archive.stat().st_size


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def split(archive: Path, carry: Path, capacities: list[int]) -> dict:
    """One part per call, each filling that call's capacity (bytes), in CARRY/callN/ort.N; a
    MANIFEST.json (every part's call, size and sha256, the whole archive's) beside each."""
    total, parts, offset = archive.stat().st_size, [], 0
    if total > sum(capacities):
        raise SystemExit(
            f"the archive ({total / MiB:.1f} MiB) does not fit {len(capacities)} calls "
            f"({sum(capacities) / MiB:.1f} MiB): shrink the working tree or the archive"
        )
    with open(archive, "rb") as f:
        for call, cap in enumerate(capacities, 1):
            if offset >= total:
                break
            data = f.read(cap)
            name = f"ort.{call}"
            folder = carry / f"call{call}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
            parts.append({"name": name, "call": call, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
            offset += len(data)
    manifest = {"archive": archive.name, "archive_bytes": total, "archive_sha256": sha256(archive),
                "calls": len(parts), "parts": parts}  # fmt: skip
    for call in range(1, len(parts) + 1):
        (carry / f"call{call}" / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ---- there: collect and assemble ------------------------------------------------------------
def collect(calldir: Path, parts: Path) -> list[str]:
    """Copy this call's parts into ``parts`` once each, each only when its sha256 holds; raise
    SystemExit naming a corrupt one. Returns the part names now present."""
    manifest = json.loads((calldir / "MANIFEST.json").read_text())
    parts.mkdir(parents=True, exist_ok=True)
    for part in manifest["parts"]:
        src, dst = calldir / part["name"], parts / part["name"]
        if dst.is_file() or not src.is_file():
            continue
        if sha256(src) != part["sha256"]:
            raise SystemExit(
                f"part {part['name']} arrived corrupt (sha256 differs): carry it again"
            )
        shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
        os.replace(dst.with_name(dst.name + ".tmp"), dst)
    shutil.copyfile(calldir / "MANIFEST.json", parts / "MANIFEST.json")
    return sorted(p["name"] for p in manifest["parts"] if (parts / p["name"]).is_file())


def assemble(parts: Path, dest: Path) -> None:
    """Every part -> the archive, checked whole -> unpacked into ``dest`` (atomically: a
    ``dest`` that exists is complete)."""
    if dest.is_dir():
        return
    manifest = json.loads((parts / "MANIFEST.json").read_text())
    missing = [p["name"] for p in manifest["parts"] if not (parts / p["name"]).is_file()]
    if missing:
        raise SystemExit(f"parts missing: {' '.join(missing)} (carried by calls "
                         f"{sorted({p['call'] for p in manifest['parts'] if p['name'] in missing})})")  # fmt: skip
    buf = io.BytesIO()
    for p in manifest["parts"]:
        buf.write((parts / p["name"]).read_bytes())
    if hashlib.sha256(buf.getbuffer()).hexdigest() != manifest["archive_sha256"]:
        raise SystemExit("the assembled archive fails its sha256: a part is wrong")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # Python < 3.12 without the backport: our own archive, names checked here
            assert all(not m.name.startswith(("/", "..")) for m in tar.getmembers())
            tar.extractall(tmp)
    os.replace(tmp, dest)


# ---- there: the project, installed as on the device -------------------------------------------
def install(repo: Path, site: Path) -> list[str]:
    """``repo``'s packages into ``site`` as pyproject's ``packages`` and ``package-dir`` lay them
    out (``train/`` -> ``iap_rt/train``, ...), package data included, with a dist-info that
    importlib.metadata reads: the same non-editable install wherever it runs (the device's
    Python may lack a build backend, and nothing can be downloaded there)."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text("utf-8"))
    dirs = meta["tool"]["setuptools"].get("package-dir", {})
    packages = meta["tool"]["setuptools"]["packages"]
    for pkg in packages:
        parent = max(
            (k for k in dirs if pkg == k or pkg.startswith(k + ".")), key=len, default=None
        )
        rel = (
            dirs[parent] + pkg[len(parent) :].replace(".", "/") if parent else pkg.replace(".", "/")
        )
        shutil.copytree(repo / rel, site / pkg.replace(".", "/"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    project = meta["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    return packages


def devpython(dest: Path) -> Path:
    """A venv in ``dest`` whose site-packages names this interpreter's purelib as a plain path:
    its packages import, but the ``.pth`` hooks there (an editable install's finder) never
    run, so the project imports only from an install on PYTHONPATH, as on the device."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    py = dest / "bin" / "python3"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    (Path(purelib) / "host-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gpu_carry.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, args in (("slim", ("wheel", "dest")), ("prune", ("src", "dst")),
                       ("pack", ("src", "archive")), ("split", ("archive", "carry", "capacities")),
                       ("collect", ("calldir", "parts")), ("assemble", ("parts", "dest")),
                       ("install", ("repo", "site")), ("devpython", ("dest",))):  # fmt: skip
        p = sub.add_parser(name)
        for arg in args:
            p.add_argument(arg, type=str if arg == "capacities" else Path)
        if name in ("slim", "prune"):
            p.add_argument("--arch", type=int, default=90)
    a = ap.parse_args(argv)
    if a.cmd == "slim":
        print(json.dumps(slim(a.wheel, a.dest, a.arch), indent=1))
    elif a.cmd == "prune":
        data, stats = prune_fatbin(a.src.read_bytes(), a.arch)
        a.dst.write_bytes(data)
        print(json.dumps({**stats, "arches_left": fatbin_arches(data)}))
    elif a.cmd == "pack":
        print(pack(a.src, a.archive))
    elif a.cmd == "split":
        caps = [int(c) for c in a.capacities.split(",")]
        print(json.dumps(split(a.archive, a.carry, caps), indent=1))
    elif a.cmd == "collect":
        print(" ".join(collect(a.calldir, a.parts)))
    elif a.cmd == "assemble":
        assemble(a.parts, a.dest)
    elif a.cmd == "install":
        print(" ".join(install(a.repo, a.site)))
    elif a.cmd == "devpython":
        print(devpython(a.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
