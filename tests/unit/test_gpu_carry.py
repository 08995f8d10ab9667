"""``bench/gpu_carry.py``: how the GPU check carries onnxruntime-gpu and the project to the
device. A CUDA library's fatbin is cut to one architecture without moving a container (the
kept entries byte for byte, everything outside the section untouched); an archive split over
calls comes back whole only when every part's checksum holds, and unpacks without an xz
binary; the project installs as pyproject lays it out (``train/`` as ``iap_rt/train``)."""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_carry.py"
spec = importlib.util.spec_from_file_location("gpu_carry", SCRIPT)
carry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry)


def entry(arch: int, payload: bytes, kind: int = 2) -> bytes:
    """One fatbin entry: a 64-byte header (kind, version, header size, payload size, ...,
    architecture at +28) and its payload."""
    head = struct.pack("<HHIQIIHHI", kind, 0x101, 64, len(payload), len(payload), 0, 8, 1, arch)
    return head + bytes(64 - len(head)) + payload


def container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", carry.FATBIN_MAGIC, 1, 16, len(body)) + body


def elf(section: bytes) -> bytes:
    """A minimal little-endian ELF64 with a .nv_fatbin section holding ``section``."""
    names = b"\0.shstrtab\0.nv_fatbin\0"
    fat_off, str_off = 64, 64 + len(section)
    shoff = str_off + len(names)
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)

    def sh(name, offset, size):
        return struct.pack("<IIQQQQIIQQ", name, 1, 2, 0, offset, size, 0, 0, 8, 0)

    shdrs = bytes(64) + sh(1, str_off, len(names)) + sh(11, fat_off, len(section))
    return bytes(header) + section + names + shdrs


def test_fatbin_keeps_one_architecture_in_place():
    sm80, sm90, sm120 = (bytes([i]) * 48 for i in (0x80, 0x90, 0x12))
    mixed = container(entry(80, sm80), entry(90, sm90), entry(120, sm120))
    only120 = container(entry(120, sm120))
    only90 = container(entry(90, sm90 * 2))
    data = elf(mixed + only120 + only90)
    pruned, stats = carry.prune_fatbin(data, 90)
    assert len(pruned) == len(data)
    assert stats == {"containers": 3, "kept": 2, "dropped": 2, "untouched": 1,
                     "bytes_dropped": 2 * (64 + 48)}  # fmt: skip
    off, size = carry.elf_section(pruned, ".nv_fatbin")
    assert pruned[:off] == data[:off] and pruned[off + size :] == data[off + size :]
    # the mixed container: its header says one entry, the sm_90 one, at its front; then zeros
    magic, _, hsize, fsize = struct.unpack_from("<IHHQ", pruned, off)
    assert (magic, hsize, fsize) == (carry.FATBIN_MAGIC, 16, 64 + 48)
    assert pruned[off + 16 : off + 16 + 64 + 48] == entry(90, sm90)
    assert pruned[off + 16 + 64 + 48 : off + len(mixed)] == bytes(len(mixed) - 16 - 64 - 48)
    # the other containers did not move and are as they were
    rest = off + len(mixed)
    assert pruned[rest : rest + len(only120) + len(only90)] == only120 + only90
    assert carry.fatbin_arches(pruned) == {90: 2, 120: 1}
    assert carry.fatbin_arches(data) == {80: 1, 90: 2, 120: 2}


def test_fatbin_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="no fatbin container"):
        carry.prune_fatbin(elf(b"\1" * 32), 90)
    with pytest.raises(ValueError, match="ELF64"):
        carry.prune_fatbin(b"MZ" + bytes(100), 90)
    broken = bytearray(container(entry(90, bytes(16))))
    struct.pack_into("<Q", broken, 8, 40)  # the container claims less than its entry
    with pytest.raises(ValueError, match="overrun"):
        carry.prune_fatbin(elf(bytes(broken)), 90)


def make_archive(tmp_path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    (src / "pkg" / "capi").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (src / "pkg" / "capi" / "lib.so").write_bytes(os.urandom(300_000))
    archive = tmp_path / "ort.tar.xz"
    carry.pack(src, archive)
    return src, archive


def test_split_collect_assemble_round_trip_without_an_xz_binary(tmp_path):
    src, archive = make_archive(tmp_path)
    manifest = carry.split(archive, tmp_path / "carry", [120_000, 120_000, 400_000])
    assert (
        manifest["calls"] == 3
        and sum(p["bytes"] for p in manifest["parts"]) == archive.stat().st_size
    )
    parts = tmp_path / "machine" / "parts"
    for call in (1, 2, 3):  # each call carries only its own folder
        assert carry.collect(tmp_path / "carry" / f"call{call}", parts)[-1] == f"ort.{call}"
    dest = tmp_path / "machine" / "ort"
    # a PATH with no xz (nor anything else): the unpacking is Python's own
    subprocess.run([sys.executable, str(SCRIPT), "assemble", str(parts), str(dest)], check=True,
                   env={"PATH": str(tmp_path / "empty")})  # fmt: skip
    assert (dest / "pkg" / "capi" / "lib.so").read_bytes() == (
        src / "pkg" / "capi" / "lib.so"
    ).read_bytes()
    carry.assemble(parts, dest)  # a second time: already there, nothing done


def test_a_corrupt_or_missing_part_is_named(tmp_path):
    _, archive = make_archive(tmp_path)
    carry.split(archive, tmp_path / "carry", [200_000, 400_000])
    part = tmp_path / "carry" / "call2" / "ort.2"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    parts = tmp_path / "parts"
    carry.collect(tmp_path / "carry" / "call1", parts)
    with pytest.raises(SystemExit, match="part ort.2 arrived corrupt"):
        carry.collect(tmp_path / "carry" / "call2", parts)
    with pytest.raises(SystemExit, match=r"parts missing: ort.2 \(carried by calls \[2\]\)"):
        carry.assemble(parts, tmp_path / "ort")
    assert not (tmp_path / "ort").exists()


def test_an_archive_too_big_for_the_calls_is_refused(tmp_path):
    _, archive = make_archive(tmp_path)
    with pytest.raises(SystemExit, match="does not fit 2 calls"):
        carry.split(archive, tmp_path / "carry", [1000, 1000])


def test_the_project_installs_as_pyproject_lays_it_out(tmp_path):
    root = SCRIPT.parents[1]
    packages = carry.install(root, tmp_path / "site")
    assert "iap_rt.train" in packages and "iap_rt.export" in packages
    site = tmp_path / "site"
    assert (site / "iap_rt" / "train" / "bench_torch.py").read_bytes() == (
        root / "train" / "bench_torch.py"
    ).read_bytes()
    assert (site / "iap_rt" / "export" / "stage.py").is_file()
    assert (site / "iap_rt" / "data" / "default_model" / "manifest.json").is_file()
    assert "Name: iap-rt" in (site / "iap_rt-0.1.0.dist-info" / "METADATA").read_text()
    assert not list(site.rglob("__pycache__"))


@pytest.mark.parametrize("archive_mib, calls", [(57.9, 2), (90, 3), (150, None)])
def test_the_plan_fills_at_most_three_calls_beside_the_working_tree(tmp_path, archive_mib, calls):
    """``gpu_check.sh resplit``: the parts, beside the tree as git sees it, fit each call's
    64 MiB; more than three calls are refused with the loud line."""
    repo = SCRIPT.parents[1]
    prep = tmp_path / "root" / "prep"
    (prep / "py").mkdir(parents=True)
    with open(prep / "ort.tar.xz", "wb") as f:
        f.truncate(int(archive_mib * 2**20))
    (prep / "py" / "diffusers-0-py3-none-any.whl").write_bytes(os.urandom(6_415_245))
    env = {**os.environ, "GPU_CHECK_ROOT": str(tmp_path / "root"),
           "GPU_CHECK_CARRY": str(tmp_path / "carry")}  # fmt: skip
    r = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh"), "resplit"], env=env,
                       capture_output=True, text=True, cwd=repo)  # fmt: skip
    if calls is None:
        assert r.returncode == 3 and "GPU CHECK STOPPED: the carry" in r.stderr
        assert "at most 3" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    runs = [ln for ln in r.stdout.splitlines() if ln.startswith("run(")]
    assert len(runs) == calls and "timeout_s=600" in runs[-1]
    tree = subprocess.run(
        "git ls-files -co --exclude-standard -z | xargs -0 du -cb | tail -n 1 | cut -f1",
        shell=True, cwd=repo, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for call in range(1, calls + 1):
        folder = tmp_path / "carry" / f"call{call}"
        carried = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert carried + int(tree) <= 64 * 2**20 - 2**20, call  # 1 MiB margin
        assert f'carry=[".gpucheck/call{call}"]' in runs[call - 1]
    assert (tmp_path / "carry" / "call1" / "py" / "diffusers-0-py3-none-any.whl").is_file()
