"""``iap-rt train --num-processes N``: start N training processes on this machine and watch them.

Each process is an ordinary ``python -m iap_rt.cli train ...`` that accelerate joins into one
process group from the environment torchrun would give it (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), plus
``ACCELERATE_USE_CPU=true`` on a machine without CUDA (gloo; NCCL on GPUs, one per process) and
``OMP_NUM_THREADS`` = cores / N unless set. Several machines: run the same command on each with
``--num-machines M --machine-rank r --main-process-ip IP_OF_RANK_0``.

Why not torchrun's agent (which ``accelerate launch`` runs): it forwards a Ctrl-C as a signal
and SIGKILLs the workers 30 s later, and a second Ctrl-C leaves them running. Here:

- the workers run in their own sessions, so a terminal's Ctrl-C reaches this supervisor only;
  the first SIGINT/SIGTERM becomes a stop request (SIGUSR1) to every worker: each stops after
  its current step, rank 0 writes a checkpoint and prints the command that resumes. A worker
  never counts the request as a signal of its own, so a scheduler that signals every process
  of the job does not make it exit without the checkpoint. A second SIGINT/SIGTERM here
  SIGKILLs the workers and exits at once. If this supervisor dies, the workers get the stop
  request (Linux: PR_SET_PDEATHSIG);
- when a worker fails, the others get an error from their next collective and stop; whoever
  is still running after ``GRACE_S`` is killed. The exit status is the first failure's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from iap_rt.errors import ConfigError
from iap_rt.train.runctl import STOP_REQUEST

GRACE_S = 60.0  # how long the other workers get to stop by themselves after one failed
POLL_S = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(
    rank: int,
    local_rank: int,
    world: int,
    local_world: int,
    machine_rank: int,
    addr: str,
    port: int,
    cuda: int,
    command: str,
) -> dict[str, str]:
    """The environment of one worker (what torchrun + accelerate launch would set)."""
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(local_world),
        GROUP_RANK=str(machine_rank),
        ROLE_RANK=str(rank),
        ROLE_WORLD_SIZE=str(world),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
        IAP_RT_COMMAND=command,
        PYTHONUNBUFFERED="1",
    )
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local_world))
    return env


def check_launch(nproc: int, machines: int, machine_rank: int, main_ip: str | None) -> None:
    if nproc < 1 or machines < 1:
        raise ConfigError(
            f"--num-processes {nproc} / --num-machines {machines} must be >= 1",
            fix="pass --num-processes N (processes on this machine, one per GPU).",
        )
    if not 0 <= machine_rank < machines:
        raise ConfigError(
            f"--machine-rank {machine_rank} is not in 0..{machines - 1}",
            fix="number the machines 0 .. --num-machines - 1; 0 is the main one.",
        )
    if machines > 1 and not main_ip:
        raise ConfigError(
            "--num-machines > 1 needs --main-process-ip (the address of machine rank 0)",
            fix="pass --main-process-ip IP --main-process-port PORT on every machine.",
        )


def launch(
    worker_argv: list[str],
    nproc: int,
    machines: int = 1,
    machine_rank: int = 0,
    main_ip: str | None = None,
    main_port: int | None = None,
    command: str = "",
) -> int:
    """Run ``python -m iap_rt.cli <worker_argv>`` in ``nproc`` processes; -> exit status."""
    check_launch(nproc, machines, machine_rank, main_ip)
    cuda = _cuda_devices()
    if cuda and cuda < nproc:
        raise ConfigError(
            f"--num-processes {nproc} but this machine has {cuda} CUDA device(s)",
            fix=f"pass --num-processes {cuda} (one process per GPU).",
        )
    world = nproc * machines
    port = main_port or (free_port() if machines == 1 else 29500)
    addr = main_ip or "127.0.0.1"
    procs: list[subprocess.Popen] = []
    for local in range(nproc):
        rank = machine_rank * nproc + local
        env = worker_env(rank, local, world, nproc, machine_rank, addr, port, cuda, command)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "iap_rt.cli", *worker_argv],
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
                preexec_fn=_stop_with_parent,
            )
        )
    return Supervisor(procs, machine_rank * nproc).wait()


class Supervisor:
    """Forward the first signal, kill on the second; stop the rest when one worker fails."""

    def __init__(self, procs: list[subprocess.Popen], first_rank: int = 0):
        self.procs, self.first_rank = procs, first_rank
        self.signals = 0
        self.status: int | None = None  # the job's exit status once decided

    def _on_signal(self, signum, frame) -> None:
        self.signals += 1
        if self.signals == 1:
            print(
                f"\niap-rt: {signal.Signals(signum).name}: the workers stop after their "
                "current step and rank 0 writes a checkpoint (signal again to exit at once)",
                file=sys.stderr,
                flush=True,
            )
            self._send(STOP_REQUEST)
            self.status = 128 + signum
        else:
            self._send(signal.SIGKILL)
            os._exit(128 + signum)

    def _send(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig) if sig == signal.SIGKILL else p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def wait(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        failed_at = None
        try:
            while any(p.poll() is None for p in self.procs):
                if failed_at is None:
                    bad = [(i, p) for i, p in enumerate(self.procs) if p.poll() not in (None, 0)]
                    if bad and not self.signals:
                        i, p = bad[0]
                        failed_at = time.monotonic()
                        self.status = _status(p.returncode)
                        print(
                            f"iap-rt: rank {self.first_rank + i} (pid {p.pid}) "
                            f"{_how(p.returncode)}; the others stop at their next exchange "
                            f"(killed after {GRACE_S:.0f}s)",
                            file=sys.stderr,
                            flush=True,
                        )
                elif time.monotonic() - failed_at > GRACE_S:
                    self._send(signal.SIGKILL)
                time.sleep(POLL_S)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        codes = [p.returncode for p in self.procs]
        if self.status is None:
            self.status = next((_status(c) for c in codes if c), 0)
        return self.status


def _stop_with_parent() -> None:
    """In the worker before exec: get the stop request when the supervisor dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(STOP_REQUEST))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _status(code: int) -> int:
    """A Popen return code as a shell exit status (killed by signal N -> 128 + N)."""
    return 128 - code if code < 0 else code


def _how(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
