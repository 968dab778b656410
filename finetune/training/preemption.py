"""Stop cleanly when the cluster asks: SIGTERM or SIGUSR1 -> finish the optimizer step, checkpoint, exit 75; Ctrl-C
(SIGINT) -> the same checkpoint, exit 130 (a second Ctrl-C stops at once).

Clusters, `timeout` and terminals signal the whole process group: the data-loader workers ignore these signals
(`ignore_stop_signals`, their worker_init_fn) and leave them to the training process, which stops them after saving.

SLURM sends SIGTERM at the end of a job's time (or SIGUSR1 `--signal=USR1@120` seconds before it); Kubernetes and
most schedulers send SIGTERM before killing a pod. A handler only records the request; the training loop checks it
after each optimizer update and all ranks agree (the flags gathered from every rank, every update), so every rank
stops at the same step, none is left waiting in a collective, and the checkpoint they write together is complete.

Exit status EXIT_PREEMPTED (75, sysexits' EX_TEMPFAIL: "try again later") means "checkpoint written, requeue me with
--resume auto". Under `accelerate launch` the launcher turns a worker's non-zero exit into its own 1 and a traceback,
so launch.sh passes FINETUNE_STATUS_FILE: the workers write "preempted" there and exit 0, launch.sh exits 75.
Prefer SIGUSR1 for multi-process runs: torchrun (under accelerate launch) answers SIGTERM itself by forwarding it to
the workers and killing them 30 s later, which a slow checkpoint may not survive; launch.sh shields the launchers
from SIGUSR1 and SIGTERM, plain `accelerate launch` does not.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
STATUS_FILE_ENV = "FINETUNE_STATUS_FILE"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """In a data-loader worker: SIGTERM, SIGUSR1 and SIGINT sent to the whole group are the training process's to
    handle; a worker that died of them would take the run down before it could save."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preempted(Exception):
    """Raised by the training loop after the checkpoint of `step` is written."""

    def __init__(self, step: int, checkpoint: Path, signal_name: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint} written")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class StopRequest:
    """Records SIGTERM/SIGUSR1 while installed; `agreed()` tells every rank whether any rank got one."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:  # Ctrl-C twice: stop now, unsaved
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum

    def install(self) -> StopRequest:
        """Idempotent; only the main thread can install signal handlers (elsewhere this records nothing)."""
        if not self._previous and threading.current_thread() is threading.main_thread():
            self.received = None
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, accelerator) -> str | None:
        """The signal's name if any rank received one (a collective: call it on every rank at the same point)."""
        code = float(self.received or 0)
        if accelerator.num_processes > 1:
            flag = torch.tensor([code], device=accelerator.device)
            code = accelerator.gather(flag).max().item()  # any rank's signal number
        return signal.Signals(int(code)).name if code else None


# The process's one request: installed by train.main() before anything is built, so a signal that arrives while the
# model loads (ignored by launch.sh's launchers, inherited as "ignore" otherwise) still stops the run at its first step.
STOP = StopRequest()


def report_preempted(signal_name: str = "SIGTERM") -> int:
    """The exit status for a stopped run (every rank stops at the same step): EXIT_PREEMPTED, or EXIT_INTERRUPTED for
    Ctrl-C; 0 under launch.sh, which reads the real status from its file and adds no launcher traceback."""
    if signal_name == signal.SIGINT.name:
        return report_status(EXIT_INTERRUPTED, every_rank=True)
    return 0 if write_status("preempted") else EXIT_PREEMPTED


def report_status(code: int, every_rank: bool) -> int:
    """The exit status for a run that stops with `code`. Under launch.sh (a status file) it is written there, and
    when every rank stops the same way the processes exit 0, so the launcher adds no traceback of its own; a failure
    of some ranks only keeps its code, so that torchrun stops the others."""
    return 0 if write_status(f"exit {code}") and every_rank else code


def write_status(text: str) -> bool:
    """Tell launch.sh how the run ended (`accelerate launch` turns any worker failure into its own exit 1)."""
    status_file = os.environ.get(STATUS_FILE_ENV)
    if not status_file:
        return False
    try:
        Path(status_file).write_text(text + "\n")
        return True
    except OSError:
        return False
