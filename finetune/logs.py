"""The project's messages through `logging`, rank-aware: every module logs to `logging.getLogger(__name__)` (under
"finetune"); `setup_logging()` routes them once per process.

On the global main rank, messages at the chosen level and above are shown (info on stdout, warnings and errors on
stderr, as plain text with no logger prefix). Other ranks show only warnings and errors, prefixed with their rank,
so an 8-GPU job prints each message once and a problem on one rank still names it. `--log-level debug` shows more,
`warning` only what needs attention. A run also writes its main rank's messages to `<output_dir>/train.log`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = "finetune"
LEVELS = ("debug", "info", "warning", "error")
LOG_FILE = "train.log"


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _Console(logging.StreamHandler):
    """A handler on sys.stdout or sys.stderr as they are when a message is written (tests and tools swap them)."""

    def __init__(self, stream_name: str):
        self.stream_name = stream_name
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, _value) -> None:
        pass


def rank() -> int:
    """The global rank from the launcher's environment (0 when not launched by accelerate/torchrun)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: str = "info", process_rank: int | None = None) -> logging.Logger:
    """Route the project's messages for this process (idempotent: a second call replaces the first's handlers)."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: choose one of {', '.join(LEVELS)}")
    process_rank = rank() if process_rank is None else process_rank
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if getattr(h, "_finetune_console", False)]:
        logger.removeHandler(handler)
    threshold = getattr(logging, level.upper())
    if process_rank != 0:
        threshold = max(threshold, logging.WARNING)
    plain = logging.Formatter("%(message)s" if process_rank == 0 else f"[rank {process_rank}] %(message)s")
    out = _Console("stdout")
    out.addFilter(_Below(logging.WARNING))
    err = _Console("stderr")
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(plain)
        handler._finetune_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(threshold)
    logger.propagate = False  # a user's root handlers would print every message a second time
    return logger


def info_enabled() -> bool:
    """Whether info messages are shown here (the main rank at --log-level debug or info)."""
    return logging.getLogger(ROOT).isEnabledFor(logging.INFO)


class LogFile:
    """The main rank's messages also go to `folder/train.log` (appended on resume) while the run lasts."""

    def __init__(self, folder: Path, enabled: bool):
        self.handler: logging.Handler | None = None
        if enabled:
            # opened at the first message: a run refused before it logs anything leaves no file (nor folder) behind
            self.handler = logging.FileHandler(Path(folder) / LOG_FILE, encoding="utf-8", delay=True)
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logging.getLogger(ROOT).addHandler(self.handler)

    def record_failure(self, err: BaseException) -> None:
        """The error that ends a run that got as far as logging, in the file only (the console shows it once, from
        the command's exit)."""
        if self.handler is not None and self.handler.stream is not None:
            name = type(err).__name__
            self.handler.handle(logging.makeLogRecord({"name": ROOT, "levelno": logging.ERROR, "levelname": "ERROR",
                                                       "msg": f"{name}: {err}" if str(err) else name}))

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger(ROOT).removeHandler(self.handler)
            self.handler.close()
            self.handler = None
