"""Metrics: one JSON object a line in ``OUT/metrics.jsonl`` (+ TensorBoard if installed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from iap_rt.fileio import write_text_atomic

log = logging.getLogger("iap_rt.train")


class MetricsLog:
    """Appends ``{"step": ..., ...}`` lines. On resume from step ``k``, lines past ``k`` (from
    the killed run) are dropped first so the log reads like one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(path)
        if self.path.is_file():
            keep = [] if resume_step is None else self._lines_upto(resume_step)
            write_text_atomic(self.path, "".join(keep))
        self.tb = _tensorboard(self.path.parent / "tensorboard") if tensorboard else None

    def _lines_upto(self, step: int) -> list[str]:
        out = []
        for line in self.path.read_text("utf-8").splitlines(keepends=True):
            try:
                if json.loads(line).get("step", 0) <= step:
                    out.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue  # a line cut by the kill
        return out

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(logdir))
