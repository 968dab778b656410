"""Metrics to a JSONL file and TensorBoard, written by the main process only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time; the JSONL file always has everything
            self.writer = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: v for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
