"""Work directories of the toy experiments (transfer grid, claim, curves, plug-in runs): the
worker pool that fills them, resumably, and the record of what they belong to.

A work dir holds results against one English base (and its plug-in part against one fine-tuned
UNet): the first use records the base's weights fingerprint, later uses with other weights are
refused, so cells, English references and caches never mix silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from iap_rt.errors import ArtifactNotFoundError, InputError
from iap_rt.fileio import write_json_atomic


def run_workers(
    tasks: list[tuple[str, str, dict, Path]],
    work: Path,
    jobs: int,
    log,
    module: str,
    on_done=None,
) -> None:
    """Run ``python -m MODULE MODE SPEC`` for every ``(mode, name, spec, result)`` whose result
    file is missing, as one-thread subprocesses, ``jobs`` at a time; each worker writes its own
    result file, so a finished task is never run again. ``on_done(name)`` after each."""
    todo = [t for t in tasks if not t[3].is_file()]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    (work / "specs").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen, str]] = []
    while todo or running:
        while todo and len(running) < jobs:
            mode, name, spec, _ = todo.pop(0)
            spec_path = work / "specs" / f"{name}.json"
            write_json_atomic(spec_path, spec)
            logf = open(work / "logs" / f"{name}.log", "w")  # noqa: SIM115 (closed with the proc)
            cmd = [sys.executable, "-m", module, mode, str(spec_path)]
            running.append((subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env), name))
            log(f"started {name}")
        time.sleep(0.5)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"{name} failed (exit {proc.returncode}); see {work}/logs/{name}.log"
                    )
                log(f"finished {name}")
                if on_done is not None:
                    on_done(name)


def base_fingerprint(base: Path) -> str:
    """sha256 over the base's UNet and text-encoder weights: what a work dir's results depend
    on (the committed base's *path* stays the same when it is retrained)."""
    h = hashlib.sha256()
    files = sorted((Path(base) / "unet").glob("*.safetensors"))
    files += sorted((Path(base) / "text_encoder").glob("*.safetensors"))
    if not files:
        raise ArtifactNotFoundError(f"{base}: no unet/ or text_encoder/ safetensors weights")
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def pin_record(
    own: Path, record: dict, *, key: str | None, refuse: str, unpinned: Path, legacy: str
) -> None:
    """Work files that belong to one producer (a base, a fine-tune): write ``record`` to ``own``
    on first use; later calls must bring the same record (or the same ``record[key]``), else
    :class:`InputError` ``refuse``. ``unpinned`` is a file only results write: present without
    ``own``, the results predate pinning and are refused with ``legacy``."""
    own = Path(own)
    if not own.is_file():
        if Path(unpinned).is_file():
            raise InputError(legacy)
        write_json_atomic(own, record)
        return
    held = json.loads(own.read_text("utf-8"))
    if (held.get(key) if key else held) != (record[key] if key else record):
        raise InputError(refuse)


def check_same_base(work: Path, base: Path) -> str:
    """A work dir holds results against one base: record its fingerprint on first use and
    refuse another base (cells, English reference and caches would silently mix). Returns
    the base's fingerprint."""
    own, fp = Path(work) / "base.json", base_fingerprint(Path(base))
    pin_record(
        own,
        {"base": str(base), "sha256": fp},
        key="sha256",
        unpinned=Path(work) / "english.json",
        refuse=f"{work} holds results made with another base than {base} (weights differ from "
        f"{own}); use a fresh --work for this base",
        legacy=f"{work} holds results made before work dirs recorded their base; use a fresh "
        f"--work, or write {own} with the base's fingerprint if you know which base made them",
    )
    return fp
