"""Atomic checkpoints that hold only what was trained, plus what resume needs.

    output_dir/checkpoints/000100/
        adapter_model.safetensors, adapter_config.json   the adapter (PEFT format), or model.safetensors for FULL
        config.json                                      the policy config (LeRobot format)
        normalization_stats.safetensors                  dataset stats the policy was trained with
        train_config.json, accelerate_config.yaml        how the run was configured and launched
        trainer_state.json                               step, samples seen
        training_state/                                  optimizer, scheduler, RNG states (Accelerate's state API;
                                                         under DeepSpeed its ZeRO-sharded checkpoint, without the base)
    output_dir/checkpoints/last -> 000100

Each checkpoint is written into a hidden temporary folder and renamed into place, then `last` is swapped atomically,
so a crash at any moment leaves the previous checkpoint complete and `last` pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from peft import PeftModel
from torch import nn

from finetune.training import distributed
from finetune.training.run_lock import pruning_allowed

TRAINING_STATE_DIR = "training_state"
TRAINER_STATE_FILE = "trainer_state.json"
LAST = "last"


def step_dir_name(step: int) -> str:
    return f"{step:06d}"


def write_trained_weights(model: nn.Module, folder: Path, save_policy_fn) -> None:
    """The adapter (and PEFT's fully trained modules) for PEFT models; the whole policy for full training."""
    if isinstance(model, PeftModel):
        model.save_pretrained(str(folder), safe_serialization=True)
    else:
        save_policy_fn(model, folder)


def save_checkpoint(
    accelerator: Accelerator,
    model: nn.Module,
    step: int,
    checkpoints_dir: Path,
    files: dict[str, Any],
    write_extra,
    keep_last: int,
    trainer_state: dict[str, Any],
) -> Path:
    """Write checkpoint `step` on all ranks (training state) and the portable parts on the main process.

    `files` maps file names to JSON-able objects or strings; `write_extra(folder)` writes the model files.
    """
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".tmp-{step_dir_name(step)}"
    error = None
    if accelerator.is_main_process:
        error = _attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
    _raise_if_any(accelerator, error, step, checkpoints_dir, tmp)
    error = _attempt(lambda: accelerator.save_state(str(tmp / TRAINING_STATE_DIR),
                                                    **distributed.save_state_kwargs(accelerator)))
    _raise_if_any(accelerator, error, step, checkpoints_dir, tmp)
    # ZeRO-3 shards every parameter: gather the trained ones (all ranks take part) so the file holds real tensors.
    with distributed.gathered(accelerator, distributed.trainable_parameters(model)):
        if accelerator.is_main_process:
            error = _attempt(lambda: write_extra(tmp))
    if accelerator.is_main_process and error is None:
        def finish() -> None:
            for name, content in files.items():
                text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
                (tmp / name).write_text(text)
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
            _fsync_tree(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _point_last(checkpoints_dir, final.name)

        error = _attempt(finish)
    _raise_if_any(accelerator, error, step, checkpoints_dir, tmp)
    if accelerator.is_main_process:
        _prune(checkpoints_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


class CheckpointWriteError(OSError):
    """The checkpoint could not be written (disk full, read-only, ...); the previous one is intact."""


def _attempt(write) -> str | None:
    try:
        write()
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    except RuntimeError as err:  # torch.save reports a full disk as "basic_ios::clear: iostream error"
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return None


def _raise_if_any(accelerator: Accelerator, error: str | None, step: int, checkpoints_dir: Path, tmp: Path) -> None:
    """All ranks learn whether any rank failed to write (so none waits in a collective) and raise together."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        errors = [e for e in gather_object([error]) if e]
        error = errors[0] if errors else None
    if error is None:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    last = checkpoints_dir / LAST
    kept = f"the last good checkpoint {last.resolve()} is kept (checkpoints/last points at it)" if last.exists() \
        else "no earlier checkpoint exists"
    free = shutil.disk_usage(checkpoints_dir).free / 2**20
    raise CheckpointWriteError(f"could not write the checkpoint of step {step} into {checkpoints_dir} ({error}; "
                               f"{free:.1f} MiB free there); {kept}. Free disk space or make the folder writable, "
                               "then rerun with --resume")


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _point_last(checkpoints_dir: Path, target: str) -> None:
    tmp_link = checkpoints_dir / f".{LAST}.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(target)
    os.replace(tmp_link, checkpoints_dir / LAST)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    return sorted(p for p in checkpoints_dir.iterdir() if p.is_dir() and not p.is_symlink() and p.name.isdigit())


def _prune(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete all but the last `keep_last` checkpoints, unless finetune-merge/eval/predict is reading one now (then
    the next save prunes)."""
    last = (checkpoints_dir / LAST).resolve()
    with pruning_allowed(checkpoints_dir) as allowed:
        for old in list_checkpoints(checkpoints_dir)[:-keep_last] if allowed else []:
            if old.resolve() != last:
                shutil.rmtree(old)
    for stale in checkpoints_dir.glob(".tmp-*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def resolve_last(checkpoints_dir: Path) -> Path:
    last = checkpoints_dir / LAST
    if not last.exists():
        raise FileNotFoundError(f"no checkpoint to resume from at {last}")
    return last.resolve()


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
