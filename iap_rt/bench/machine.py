"""What the benchmark ran on and what a process used: CPU, memory, GPUs, library versions, load
average, peak RSS, GPU memory (``/proc`` and ``nvidia-smi``; no torch)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

VERSION_PACKAGES = (
    "iap-rt",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "tokenizers",
    "torch",
    "diffusers",
    "transformers",
    "onnx",
    "tensorrt",
    "tensorrt-rtx",
    "tensorrt-rtx-cu13",
    "polygraphy",
    "nvidia-pytriton",
    "tritonclient",
    "fastapi",
    "uvicorn",
)


def machine_info() -> dict:
    """CPU, cores, memory, GPU and library versions (no torch import)."""
    import importlib.metadata

    cpu = platform.processor() or platform.machine()
    mem_gb, cpu_id = None, {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (p.strip() for p in line.partition(":"))
            if key == "model name":
                cpu = value
            elif key in ("cpu family", "model", "stepping") and key not in cpu_id:
                cpu_id[key.replace("cpu ", "")] = int(value) if value.isdigit() else value
            elif key == "flags":  # a virtual CPU's name can be just "AMD EPYC": say which
                cpu_id["avx512"] = "avx512f" in value.split()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpus = []
    out = nvidia_smi(
        ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"]
    )
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory_mb": parts[1], "driver": parts[2]})
    versions = {}
    for pkg in VERSION_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except ImportError:
        providers = []
    return {
        "cpu": cpu,
        "cpu_id": cpu_id or None,  # family/model/stepping + AVX-512: which generation
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gb": mem_gb,
        "gpu": gpus or None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "onnxruntime_providers": providers,
        "loadavg_start": loadavg(),
    }


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (VmHWM; getrusage where /proc lacks it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def process_gpu_mb(pid: int) -> float | None:
    """GPU memory ``pid`` holds now (ORT's arena keeps its peak), via nvidia-smi."""
    out = nvidia_smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return float(parts[1])
    return None


def nvidia_smi(args: list[str]) -> str | None:
    """``nvidia-smi ARGS``'s stdout, or None where it is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (Linux ``/proc``): a server and its children."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def find_process(root: int, name: str) -> int | None:
    """The pid of the first process named ``name`` (``/proc/PID/comm``) under ``root``."""
    for pid in process_tree(root):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                return pid
        except OSError:
            continue
    return None
