"""Training progress for people and for cluster logs: a tqdm bar on a terminal; elsewhere (a SLURM log, a file, a
pipe) one plain line every few seconds and at the end, never a carriage-return frame per step."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool, every_s: float = 30.0, stream: TextIO | None = None,
                 desc: str = "train"):
        self.stream = stream or sys.stderr
        self.total, self.step, self.enabled, self.every_s, self.desc = total, initial, enabled, every_s, desc
        self.terminal = enabled and self.stream.isatty()
        self.bar = None
        if self.terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=self.stream)
        self.started, self.start_step = time.monotonic(), initial
        self.last_line = self.started
        self.postfix: dict[str, Any] = {}

    def update(self, step: int, **postfix: Any) -> None:
        """The run reached `step`; `postfix` (loss, lr, samples_s, ...) is shown with it when given."""
        if not self.enabled:
            return
        advanced, self.step = step - self.step, step
        self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix)
            self.bar.update(advanced)
            return
        now = time.monotonic()
        if now - self.last_line >= self.every_s or step == self.total:
            self.last_line = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        done = self.step - self.start_step
        rate = done / max(now - self.started, 1e-9)
        eta = timedelta(seconds=round((self.total - self.step) / rate)) if rate > 0 else "?"
        shown = " ".join(f"{k} {v}" for k, v in self.postfix.items())
        return (f"{self.desc} step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%) {shown} "
                f"{rate:.2f} steps/s eta {eta}").replace("  ", " ")

    def write(self, text: str) -> None:
        """An info message, logged with the bar cleared around it (the logger decides whether this rank shows it)."""
        with self.bar.external_write_mode() if self.bar is not None else contextlib.nullcontext():
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
