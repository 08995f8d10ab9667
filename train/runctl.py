"""Stopping a training run cleanly: signals, a lost process, the command that resumes.

- :class:`StopSignals`: the first SIGINT/SIGTERM only sets a flag (the loop finishes its step,
  writes a checkpoint and raises :class:`TrainingInterrupted`); it also restores the default
  action, so a second signal ends the process at once, even inside a long C call.
- :func:`agree` makes the ranks stop at the same step: the flags are max-reduced every step.
- :func:`lost_peer`: a collective that failed because another process died (gloo: "Connection
  closed by peer") becomes :class:`ProcessGroupError` on every surviving rank.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

import torch

from iap_rt.errors import IapRtError


class TrainingInterrupted(IapRtError):
    """The run was stopped by a signal (after writing a checkpoint)."""

    def __init__(self, message: str, fix: str | None, signum: int):
        super().__init__(message, fix)
        self.exit_code = 128 + signum


class ProcessGroupError(IapRtError):
    """Another process of the training job died or could not be reached."""


STOP_REQUEST = signal.SIGUSR1  # what the launcher sends: "stop cleanly", never "exit now"


class StopSignals:
    """Remember the first SIGINT/SIGTERM; let a second one terminate the process.

    :data:`STOP_REQUEST` (SIGUSR1, sent by ``--num-processes``'s supervisor, also when it dies)
    asks for the same clean stop but does not count as a first signal: a scheduler that
    signals every process of a job (SLURM's scancel) and the supervisor forwarding that signal
    must not add up to "exit at once"."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._old: dict = {}

    def __enter__(self) -> StopSignals:
        for s in (*self.SIGNALS, STOP_REQUEST):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        if signum == STOP_REQUEST:
            self.signum = self.signum or signum
            return
        self.signum = signum
        for s in self.SIGNALS:  # the next one takes the default action: exit now
            signal.signal(s, signal.SIG_DFL)
        if self.announce:
            print(
                f"\n{signal.Signals(signum).name}: stopping after the current step (a checkpoint "
                "is written); send it again to exit at once",
                file=sys.stderr,
                flush=True,
            )

    @property
    def requested(self) -> bool:
        return self.signum is not None


def signal_name(signum: int) -> str:
    if signum == STOP_REQUEST:
        return "the launcher"
    return signal.Signals(signum).name


def agree(acc, signum: int | None) -> int | None:
    """The signal any rank got (the same answer on every rank), or None."""
    if acc.num_processes == 1:
        return signum
    t = torch.tensor([signum or 0], dtype=torch.int64, device=acc.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item()) or None


_PEER_WORDS = ("connection closed", "connection reset", "broken pipe", "timed out", "nccl", "gloo")


def lost_peer(e: BaseException, world: int) -> bool:
    """Whether ``e`` is a collective failing because another process is gone."""
    if world == 1:
        return False
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(e, dist_error) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _PEER_WORDS)
    )


def resume_command(command: str, resume: bool = True) -> str:
    """What to run to continue: this run's command (as ``iap-rt train`` or the supervisor
    recorded it), with ``--resume`` when there is a checkpoint to resume from; under another
    launcher, that launcher's line with these arguments."""
    cmd = os.environ.get("IAP_RT_COMMAND") or command
    if resume and "--resume" not in shlex.split(cmd):
        cmd += " --resume"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not os.environ.get("IAP_RT_COMMAND"):
        args = cmd.split(" ", 1)[1] if cmd.startswith("iap-rt ") else cmd
        return f"your launcher's command (torchrun/accelerate launch) with: -m iap_rt.cli {args}"
    return cmd
