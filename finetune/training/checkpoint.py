"""Atomic checkpoints that hold only what was trained, plus what resume needs.

    output_dir/checkpoints/000100/
        adapter_model.safetensors, adapter_config.json   the adapter (PEFT format), or model.safetensors for FULL
        config.json                                      the policy config (LeRobot format)
        normalization_stats.safetensors                  dataset stats the policy was trained with
        train_config.json, accelerate_config.yaml        how the run was configured and launched
        trainer_state.json                               step, samples seen
        training_state/                                  optimizer, scheduler, RNG states without pickles
                                                         (finetune.training.state; under DeepSpeed its ZeRO-sharded
                                                         checkpoint, without the base)
    output_dir/checkpoints/last -> 000100

Each checkpoint is written into a hidden temporary folder, its files and folders fsynced, renamed into place, then
`last` is swapped atomically (and the folder fsynced), so a crash at any moment leaves the previous checkpoint complete
and `last` pointing at it. Re-saving a step never deletes its old copy before the new one is in place: the old copy
moves aside (`.old-<step>`) and is deleted after; a crash in between is undone by `recover_interrupted_save`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from peft import PeftModel
from safetensors import SafetensorError
from torch import nn

from finetune.training import distributed
from finetune.training.run_lock import pruning_allowed
from finetune.training.state import sign_pickles

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


def base_model_name(policy_path: str, policy_dir: Path) -> str:
    """How an adapter names its base for LeRobot's PEFT loading: the Hub id as given, a local folder by absolute path
    (so it resolves from any working directory)."""
    return str(policy_dir.resolve()) if Path(policy_path).expanduser().exists() else policy_path


def write_lerobot_adapter_files(folder: Path, base_name: str) -> None:
    """What LeRobot's own PEFT loading reads besides the adapter: `base_model_name_or_path` in adapter_config.json
    (the base it builds first) and `use_peft` in config.json (which sends --policy.path down its PEFT path)."""
    for sub in (folder, folder / "ema"):
        path = sub / "adapter_config.json"
        if path.is_file():
            adapter_config = json.loads(path.read_text())
            adapter_config["base_model_name_or_path"] = base_name
            path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    accelerator: Accelerator,
    model: nn.Module,
    step: int,
    checkpoints_dir: Path,
    files: dict[str, Any],
    write_extra,
    keep_last: int,
    trainer_state: dict[str, Any],
    write_state,
) -> Path:
    """Write checkpoint `step` on all ranks (training state) and the portable parts on the main process.

    `files` maps file names to JSON-able objects or strings; `write_extra(folder)` writes the model files on the main
    process, `write_state(folder)` the optimizer, scheduler and RNG states on every rank.
    """
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".tmp-{step_dir_name(step)}"
    error = None
    if accelerator.is_main_process:
        error = _attempt(lambda: (recover_interrupted_save(checkpoints_dir), shutil.rmtree(tmp, ignore_errors=True),
                                  tmp.mkdir(parents=True)))
    _raise_if_any(accelerator, error, step, checkpoints_dir, tmp)
    error = _attempt(lambda: write_state(tmp / TRAINING_STATE_DIR))
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
            sign_pickles(tmp / TRAINING_STATE_DIR)  # DeepSpeed's pickled state: trusted on resume by this user only
            _fsync_tree(tmp)
            _move_into_place(tmp, final)
            _point_last(checkpoints_dir, final.name)

        error = _attempt(finish)
    _raise_if_any(accelerator, error, step, checkpoints_dir, tmp)
    if accelerator.is_main_process:
        _prune(checkpoints_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


class CheckpointWriteError(OSError):
    """The checkpoint could not be written (disk full, read-only, ...); the previous one is intact."""


# How torch.save and safetensors report a write that failed (a full disk: "basic_ios::clear: iostream error", "I/O
# error: No space left on device"); any other RuntimeError is a bug, not a write failure, and is raised as it is.
WRITE_FAILURES = ("iostream error", "PytorchStreamWriter failed", "file write failed", "No space left", "I/O error")


def _attempt(write) -> str | None:
    try:
        write()
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    except (RuntimeError, SafetensorError) as err:
        if not any(sign in str(err) for sign in WRITE_FAILURES):
            raise
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
    """Files first, then the folders that name them (a renamed folder is only durable once its parent is synced)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(path)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _aside(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the written checkpoint to its step's name. Re-saving a step (e.g. after a resume): the old copy moves
    aside first and is deleted only once the new one is in place."""
    if final.exists():
        old = _aside(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
        _fsync_dir(final.parent)


def recover_interrupted_save(checkpoints_dir: Path) -> None:
    """Undo a re-save cut short between moving the old copy aside and renaming the new one in: the old copy goes
    back to its name (`last` may point at it); an aside copy whose step folder is in place is deleted."""
    if not checkpoints_dir.is_dir():
        return
    for old in checkpoints_dir.glob(".old-*"):
        final = checkpoints_dir / old.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def _point_last(checkpoints_dir: Path, target: str) -> None:
    tmp_link = checkpoints_dir / f".{LAST}.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(target)
    os.replace(tmp_link, checkpoints_dir / LAST)
    _fsync_dir(checkpoints_dir)


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    return sorted(p for p in checkpoints_dir.iterdir() if p.is_dir() and not p.is_symlink() and p.name.isdigit())


def _prune(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete all but the last `keep_last` checkpoints, unless finetune-merge/eval/predict is reading one now (then
    the next save prunes)."""
    last = (checkpoints_dir / LAST).resolve()
    with pruning_allowed(checkpoints_dir) as allowed:
        for old in list_checkpoints(checkpoints_dir)[:-keep_last] if allowed else []:
            if old.resolve() != last:  # renamed first: a crash mid-delete leaves no half checkpoint under a step name
                doomed = old.with_name(f".del-{old.name}")
                os.replace(old, doomed)
                shutil.rmtree(doomed)
    for stale in (*checkpoints_dir.glob(".tmp-*"), *checkpoints_dir.glob(".del-*")):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def resolve_last(checkpoints_dir: Path) -> Path:
    recover_interrupted_save(checkpoints_dir)
    last = checkpoints_dir / LAST
    if not last.exists():
        raise FileNotFoundError(f"no checkpoint to resume from at {last}")
    return last.resolve()


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
