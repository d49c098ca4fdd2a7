"""A training run as a job: one writer per run directory, rank 0 deciding for every rank, and a clean stop on the
signal a scheduler sends before it kills the job.

    with job.RunLock(out_dir, dist), job.GracefulStop() as stop:    # train.py's main()
        ...; stop.arm()                                             # just before the loop
        ...; if stop.requested(dist): save, then leave the loop     # after every step

- RunLock: `fcntl.flock` on out_dir/.lock, which holds the owner's pid. A second train.py on the same out_dir exits
  at once, naming that process, instead of interleaving metrics.jsonl and removing the first one's temp
  directories. The kernel drops the lock when its holder exits, however it dies, so a stale .lock file is harmless.
  Under torchrun only rank 0 takes it, and every rank learns whether it could (one collective), so when rank 0
  cannot, the whole job exits instead of leaving the other ranks waiting at their first collective.
- GracefulStop: SIGTERM (what SLURM, Kubernetes and torchrun send before killing) and SIGINT (Ctrl-C) set a flag;
  train.py finishes the step it is in, writes a checkpoint and exits with 128 + the signal's number (143 for
  SIGTERM, 130 for SIGINT: what a shell reports for a process the signal killed, so that `train && eval` does not
  go on as if the run had finished). Re-running the same command resumes from that checkpoint exactly. Under
  torchrun the ranks receive the signal at slightly different moments: `requested` sums the flag over ranks once a
  step, so that every rank stops after the same step and saves the same checkpoint together. A second signal acts
  as it would have without us (SIGINT raises KeyboardInterrupt, SIGTERM kills).
"""

import fcntl
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from training import parallel

T = TypeVar("T")
LOCK_FILE = ".lock"


def rank0_first(d: parallel.Dist, decide: Callable[[bool], T]) -> T:
    """decide(True) on rank 0; once it has succeeded, decide(False) on the other ranks (which see what rank 0 did to
    the files). If it raises on any rank, every rank stops: that rank with its error, the others with a line that
    points to it. A collective per stage, so no rank is left waiting for one that has gone."""
    result, error = None, None
    for stage_is_main in (True, False):
        if d.main == stage_is_main:
            try:
                result = decide(d.main)
            except (Exception, SystemExit) as e:
                error = e
        failed = int(parallel.all_reduce_sum(d, torch.tensor(int(error is not None), device=d.device)))
        if error is not None:
            raise error
        if failed:
            raise SystemExit(f"rank {d.rank}: stopping, as {'rank 0' if stage_is_main else 'another rank'} "
                             f"failed (its message says why)")
    return result


class RunLock:
    """Exclusive use of a run directory by one job (see the module docstring); a context manager."""

    def __init__(self, out_dir: str | Path, d: parallel.Dist | None = None):
        self.path, self.d, self.fd = Path(out_dir) / LOCK_FILE, d or parallel.Dist(), None

    def __enter__(self) -> "RunLock":
        rank0_first(self.d, lambda main: self._acquire() if main else None)
        return self

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SystemExit(f"{self.path.parent} is in use by another training process (pid {holder}, which holds "
                             f"{self.path}): wait for it to finish or stop it, or give this run another "
                             f"--out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


class GracefulStop:
    """SIGTERM / SIGINT: stop after the current step (see the module docstring); a context manager that puts the
    previous handlers back. Nothing changes until `arm()`: before the loop there is nothing to save, and Ctrl-C
    during data preparation must interrupt at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum, self._previous = 0, {}

    def __enter__(self) -> "GracefulStop":
        return self

    def arm(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum
        self._restore()  # a second signal: what it would have done without us

    def requested(self, d: parallel.Dist) -> bool:
        """Whether any rank got a signal (a collective under torchrun: every rank calls it after every step)."""
        if not d.sharded:
            return bool(self.signum)
        flags = torch.tensor([int(self.signum == s) for s in self.SIGNALS], device=d.device)
        flags = parallel.all_reduce_sum(d, flags)
        if not self.signum and bool(flags.any()):
            self.signum = self.SIGNALS[int(flags.argmax())]  # the signal another rank got
        return bool(self.signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
