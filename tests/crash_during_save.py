"""Driver for tests/test_checkpoint_crash.py (run as its own process: it forks): a real run's checkpoint save is cut
short by a crash before each of its filesystem operations in turn, and after each crash `checkpoints/last` must load.

    python tests/crash_during_save.py POLICY_DIR DATASET_ROOT OUT_DIR new|resave   ->  JSON lines on stdout
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import set_up_run, train_args  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from finetune import train  # noqa: E402
from finetune.training import checkpoint as ckpt  # noqa: E402

FILESYSTEM_CALLS = ("replace", "rename", "symlink", "unlink", "remove", "rmdir", "mkdir", "fsync")


def crash_at(k: int) -> None:
    """From now on, exit at once (as a crash would, no cleanup) right before the k-th filesystem operation."""
    count = [0]

    def counted(fn):
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os._exit(9)
            return fn(*args, **kwargs)
        return wrapper

    for name in FILESYSTEM_CALLS:
        setattr(os, name, counted(getattr(os, name)))
    real_open = io.open

    def writing_open(file, mode="r", *args, **kwargs):
        return (counted(real_open) if any(c in mode for c in "wax+") else real_open)(file, mode, *args, **kwargs)

    builtins.open = io.open = writing_open


def check_last(checkpoints: Path, adapter_keys: set[str]) -> dict:
    """What a resume or finetune-predict would load after the crash."""
    try:
        last = ckpt.resolve_last(checkpoints)  # undoes an interrupted re-save first
        state = ckpt.load_trainer_state(last)
        json.loads((last / "config.json").read_text())
        json.loads((last / "train_config.json").read_text())
        keys = set(load_file(str(last / "adapter_model.safetensors")))
        assert keys == adapter_keys, sorted(keys ^ adapter_keys)[:4]
        assert (last / ckpt.TRAINING_STATE_DIR / "optimizer.safetensors").is_file()
        return {"loads": True, "step": state["step"]}
    except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
        return {"loads": False, "error": f"{type(err).__name__}: {err}"}


def main() -> None:
    policy_dir, dataset_root, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    run = set_up_run(train_args(policy_dir, dataset_root, out, "--steps", "3", "--checkpoint.keep-last", "1"))
    checkpoints = run.cfg.checkpoints_dir
    steps_before = (1,) if mode == "new" else (1, 2)
    for step in steps_before:
        run.step = step
        train.save(run)
    adapter_keys = set(load_file(str(checkpoints / "last" / "adapter_model.safetensors")))
    snapshot = out.parent / "snapshot"
    shutil.copytree(checkpoints, snapshot, symlinks=True)
    run.step = 2  # "new": a step not saved yet (then step 1 is pruned); "resave": step 2 again
    for k in range(1, 2000):
        shutil.rmtree(checkpoints)
        shutil.copytree(snapshot, checkpoints, symlinks=True)
        pid = os.fork()
        if pid == 0:
            crash_at(k)
            train.save(run)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        finished = os.waitstatus_to_exitcode(status) == 0
        print(json.dumps({"k": k, "finished": finished, **check_last(checkpoints, adapter_keys)}), flush=True)
        if finished:
            break


if __name__ == "__main__":
    main()
