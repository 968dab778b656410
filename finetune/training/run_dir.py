"""The output folder and the resume policy: one run per folder at a time (finetune.training.run_lock), `--resume` /
`--resume auto` / `--overwrite`, and refusing a resume whose settings or topology would change the training trajectory.

The main process owns the folder and decides; every rank receives the decision (or the error) from it, so all ranks
continue or stop together even when they do not share a filesystem.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from finetune.config import RESUME_AUTO, ConfigError, TrainConfig, from_dict, trajectory_changes
from finetune.logs import LOG_FILE
from finetune.training import checkpoint as ckpt
from finetune.training import distributed as dist
from finetune.training.preflight import earlier_checkpoint_fix
from finetune.training.run_lock import LOCK_FILE, READ_LOCK_FILE, RunLock

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_LOCK_WAIT_S = 300.0  # --resume auto: how long a requeued job waits for its predecessor to let go


def decide_on_main(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """Run `decide()` on the main process and hand its result, or its ConfigError, to every rank."""
    result: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            result = [("ok", decide())]
        except ConfigError as err:
            result = [("error", str(err))]
    if accelerator.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    kind, value = result[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def resolve_resume(cfg: TrainConfig, accelerator: Accelerator) -> TrainConfig:
    """`--resume auto` -> resume when checkpoints/last exists, else a fresh run (decided by the main process)."""
    if cfg.resume != RESUME_AUTO:
        return cfg
    found = decide_on_main(accelerator, lambda: (cfg.checkpoints_dir / ckpt.LAST).exists())
    what = f"resuming from {cfg.checkpoints_dir / ckpt.LAST}" if found else \
        f"no checkpoint in {cfg.checkpoints_dir}, starting fresh"
    log.info(f"--resume auto: {what}")
    return dataclasses.replace(cfg, resume=bool(found))


def claim_output_dir(cfg: TrainConfig, accelerator: Accelerator, auto: bool) -> None:
    """A fresh run needs an empty output folder: refuse one holding another run, or move it aside (--overwrite).
    With --resume auto and no checkpoint, the partial logs of the same run are dropped."""

    def decide() -> None:
        out = Path(cfg.output_dir)
        if not run_contents(out):
            return
        if cfg.overwrite:
            aside = move_aside(out, out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
            log.info(f"--overwrite: starting a new run in {out}; the previous run there was moved to {aside}")
            return
        saved = out / "train_config.json"
        if auto and saved.is_file() and not (cfg.checkpoints_dir / ckpt.LAST).exists():
            try:
                same = not trajectory_changes(from_dict(json.loads(saved.read_text())), cfg)
            except (json.JSONDecodeError, TypeError, ValueError):
                same = False
            if same:  # the same run stopped before its first checkpoint: its logs are retrained from step 0
                for name in ("metrics.jsonl", "tensorboard"):
                    path = out / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                log.info(f"--resume auto: {out} holds the same run stopped before its first checkpoint; "
                         "starting it again from step 0 (its partial metrics were dropped)")
                return
        held = ", ".join(p.name + ("/" if p.is_dir() else "") for p in run_contents(out)[:4])
        raise ConfigError(f"--output-dir {out} is not empty ({held}): continue that run with --resume (or --resume "
                          "auto), choose a new --output-dir, or pass --overwrite to move the old run aside "
                          f"(to {out.name}.old-<time>) and start over")

    decide_on_main(accelerator, decide)


def move_aside(folder: Path, aside: Path) -> str:
    """Move what `folder` holds into `aside` (an older `aside` is deleted), keeping the run lock where it is; returns
    how to say where it went."""
    note = ""
    if aside.exists():
        shutil.rmtree(aside)
        note = f" (replacing the older {aside})"
    aside.mkdir(parents=True)
    for path in run_contents(folder):
        path.rename(aside / path.name)
    return f"{aside}{note}"


def run_contents(folder: Path) -> list[Path]:
    """What a run folder holds, less the locks (finetune.training.run_lock) and the log of attempts that never got as
    far as training (a run appends to it)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name not in (LOCK_FILE, READ_LOCK_FILE, LOG_FILE))


def hold_output_dir(cfg: TrainConfig, accelerator: Accelerator) -> RunLock | None:
    """Take the output folder for this run (main process; every rank learns whether it could). `--wait-for-lock`
    waits for a run still holding it; by default only `--resume auto` (a requeued job) waits."""
    wait = cfg.wait_for_lock if cfg.wait_for_lock is not None else \
        (DEFAULT_LOCK_WAIT_S if cfg.resume == RESUME_AUTO else 0.0)
    held: list[RunLock] = []

    def decide() -> None:
        held.append(RunLock.acquire(cfg.output_dir, wait))

    decide_on_main(accelerator, decide)
    return held[0] if held else None


def check_resume(cfg: TrainConfig, accelerator: Accelerator) -> dict[str, Any]:
    """Refuse, before anything is built, a resume whose configuration or topology would change the training
    trajectory; return the checkpoint's trainer state."""

    def decide() -> dict[str, Any]:
        last = ckpt.resolve_last(cfg.checkpoints_dir)
        try:
            saved = from_dict(json.loads((last / "train_config.json").read_text()))
            state = ckpt.load_trainer_state(last)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise ConfigError(f"{last}: train_config.json / {ckpt.TRAINER_STATE_FILE} cannot be read "
                              f"({type(err).__name__}); {earlier_checkpoint_fix(last)}") from None
        # default mixture weights resolve to the saved ones from the same datasets
        weights = ("dataset.weights",) if cfg.dataset.weights is None else ()
        changes = trajectory_changes(saved, cfg, ignore=("batch_size", *weights))
        changes += topology_changes(saved, state, cfg, accelerator)
        if changes:
            raise ConfigError(f"--resume: {last} was trained with other settings that shape training: "
                              f"{'; '.join(changes)}. Resume with the checkpoint's values or start a new --output-dir")
        return {**state, "checkpoint": str(last)}

    return decide_on_main(accelerator, decide)


def topology_changes(saved: TrainConfig, state: dict[str, Any], cfg: TrainConfig, accelerator: Accelerator) -> list:
    """A resumed run continues the same trajectory when each global micro-batch (micro-batch x processes) is the same:
    the sampler position and the flow-matching noise are indexed by global micro-batch. DDP and one process keep a
    full optimizer state on every rank, so their process count may change; a ZeRO-sharded state may not."""
    world = state.get("world_size")
    if world is None:  # a checkpoint from before world sizes were recorded
        return [f"--batch-size: {saved.batch_size} -> {cfg.batch_size}"] if saved.batch_size != cfg.batch_size else []
    out = []
    then, now = saved.batch_size * world, cfg.batch_size * accelerator.num_processes
    if then != now:
        keep = then / accelerator.num_processes
        hint = f"pass --batch-size {int(keep)}" if keep == int(keep) else f"use a process count dividing {then}"
        out.append(f"global micro-batch: {saved.batch_size} x {world} process(es) = {then} at save, now "
                   f"{cfg.batch_size} x {accelerator.num_processes} = {now} ({hint} to keep the batch and the data "
                   "position)")
    was = (state.get("distributed_type"), state.get("zero_stage"))
    ds_now = dist.is_deepspeed(accelerator)
    if (was[0] == "DEEPSPEED") != ds_now or (ds_now and was[1] != dist.zero_stage(accelerator)):
        out.append(f"topology: saved under {was[0]}{f' ZeRO-{was[1]}' if was[1] is not None else ''}, now "
                   f"{accelerator.distributed_type.value}; the optimizer state is stored differently, resume with the "
                   "checkpoint's accelerate config")
    elif ds_now and world != accelerator.num_processes:
        out.append(f"processes: {world} at save, now {accelerator.num_processes}; the optimizer state is sharded by "
                   f"ZeRO over {world} ranks: resume with {world} processes")
    return out
