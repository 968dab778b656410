"""Metrics to metrics.jsonl and to experiment trackers (Accelerate's tracker classes), main process only.

A run that resumes from the checkpoint of step S continues its logs from S: rows after S (written between that
checkpoint and a crash or preemption) are dropped from metrics.jsonl, and TensorBoard is opened with purge_step S+1 so
readers discard the old events after S. A fresh run starts a new metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from finetune.config import ConfigError

TENSORBOARD_DIR = "tensorboard"
# What evaluation writes into a run folder (finetune-eval, the demo); model cards quote them.
CLOSED_LOOP_FILE = "eval/closed_loop.json"
OFFLINE_METRICS_FILE = "eval/offline_metrics.json"


def check_trackers(names: tuple[str, ...]) -> None:
    """Refuse a tracker that is not installed or, for wandb, not configured (before any model is built)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import is_wandb_available

    for name in names:
        if name == "none":
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"--log-with {name}: this Accelerate has no such tracker; choose from "
                              f"{' '.join(sorted(LOGGER_TYPE_TO_CLASS))} or none")
        if name == "tensorboard":
            continue
        from accelerate.utils import imports

        available = getattr(imports, f"is_{name}_available", None)
        if available is not None and not available():
            raise ConfigError(f"--log-with {name}: the {name} package is not installed; `pip install {name}` or drop it"
                              " (metrics.jsonl and TensorBoard are written anyway)")
        if name == "wandb" and is_wandb_available():
            _configure_wandb()


def _configure_wandb() -> None:
    """wandb runs offline when the machine is (HF_HUB_OFFLINE=1 or WANDB_MODE=offline); online it needs a login."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        os.environ["WANDB_MODE"] = "offline"  # syncable later with `wandb sync`
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    if not logged_in:
        raise ConfigError("--log-with wandb: not logged in (no WANDB_API_KEY, no api.wandb.ai entry in ~/.netrc); run "
                          "`wandb login`, or set WANDB_MODE=offline to log locally and `wandb sync` later")


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool = True, resume_step: int | None = None,
                 trackers: tuple[str, ...] = ("tensorboard",), config: dict[str, Any] | None = None):
        """resume_step: the step of the checkpoint the run resumed from (None: a fresh run)."""
        self.enabled = enabled
        self.trackers: list[Any] = []
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "metrics.jsonl"
        kept = [] if resume_step is None or not path.is_file() else \
            [row for row in read_metrics(path) if row.get("step", 0) <= resume_step]
        with open(path, "w") as fh:  # rewritten whole: a crash mid-write loses at most the dropped rows
            fh.writelines(json.dumps(row) + "\n" for row in kept)
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()
        self.trackers = [_start_tracker(name, output_dir, resume_step, config) for name in trackers if name != "none"]

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: v for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            for tracker in self.trackers:
                tracker.finish()


def _start_tracker(name: str, output_dir: Path, resume_step: int | None, config: dict[str, Any] | None):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        # purge_step: TensorBoard readers drop events at or after it that an earlier attempt wrote
        kwargs = {} if resume_step is None else {"purge_step": resume_step + 1}
        tracker = cls(TENSORBOARD_DIR, str(output_dir), **kwargs)
    elif cls.requires_logging_directory:
        tracker = cls(output_dir.name, str(output_dir))
    else:
        tracker = cls(output_dir.name)
    tracker.start()
    if config is not None and name != "tensorboard":  # TensorBoard's hparams would add a timestamped sub-run
        tracker.store_init_configuration(config)
    return tracker


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- reading a finished run's figures ---------------------------------------------------------------------------------

def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run folder of `output_dir/checkpoints/<step>` (or `.../last`), None for a folder elsewhere."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def run_metrics(run_dir: Path | None) -> dict[str, Any]:
    """Headline figures of a run: held-out action MSE first/last, last train loss, closed-loop success if measured."""
    if run_dir is None:
        return {}
    out: dict[str, Any] = {}
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        rows = read_metrics(metrics_file)
        evals = [r for r in rows if "eval/action_mse" in r]
        losses = [r for r in rows if "train/loss" in r]
        if evals:
            out["heldout_action_mse_first"] = {"step": evals[0]["step"], "value": evals[0]["eval/action_mse"]}
            out["heldout_action_mse_last"] = {"step": evals[-1]["step"], "value": evals[-1]["eval/action_mse"]}
        if losses:
            out["train_loss_last"] = {"step": losses[-1]["step"], "value": losses[-1]["train/loss"]}
    for name, file in (("closed_loop", CLOSED_LOOP_FILE), ("offline_eval", OFFLINE_METRICS_FILE)):
        if (run_dir / file).is_file():
            out[name] = json.loads((run_dir / file).read_text())
    return out
