"""One run per output folder at a time: a second run is refused (or waits with --resume auto) and never writes into
the first one's folder; a killed holder leaves no stale lock; readers of a running folder never see a checkpoint
pruned or replaced under them. The runs are real processes started the way users start them."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import train_args
from test_preemption import env, losses, wait_until_training

from finetune import train
from finetune.training import checkpoint as ckpt
from finetune.training import run_lock
from finetune.training.metrics import read_metrics
from finetune.training.run_lock import LOCK_FILE, RunLock, read_holder, reading_checkpoint

REPO = Path(__file__).resolve().parent.parent
LONG = "20000"  # far more steps than any of these runs gets to: each is stopped by a signal


def start(args: list[str], cwd: Path, launcher: list[str] | None = None, **extra_env: str) -> subprocess.Popen:
    command = launcher or [sys.executable, str(REPO / "finetune/train.py")]
    return subprocess.Popen([*command, *args], env=env(**extra_env), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def signal_every_process(proc: subprocess.Popen, sig: int) -> None:
    """As SLURM signals a job step: every process of it (torchrun starts its ranks in sessions of their own, out of
    reach of a process-group signal)."""
    import psutil

    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_no_step_logged_twice(out: Path) -> None:
    rows = [m["step"] for m in read_metrics(out / "metrics.jsonl") if "train/loss" in m]
    assert rows and not [step for step, n in Counter(rows).items() if n > 1]


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_second_run_on_a_held_folder_is_refused_and_a_requeued_one_waits(processes, policy_dir, dataset_root,
                                                                           tmp_path):
    out = tmp_path / "run"
    launcher = None
    extra: dict[str, str] = {}
    if processes == 2:
        from test_distributed import free_port

        launcher = ["bash", str(REPO / "launch.sh"), "--config", "cpu_ddp"]
        extra = {"ACCELERATE_USE_CPU": "true", "MASTER_PORT": str(free_port()), "FINETUNE_DIST_TIMEOUT_S": "120"}
    common = ["--checkpoint.every", "1000", "--batch-size", str(4 // processes)]
    a = start(train_args(policy_dir, dataset_root, out, "--steps", LONG, *common, "--resume", "auto"), tmp_path,
              launcher, **extra)  # A: far longer than the test; stopped (preempted) below
    waiting = None
    try:
        wait_until_training(a, out)
        holder = read_holder(out)
        assert holder["host"] == socket.gethostname() and holder["locking"] == "flock"

        # B, a plain second start: refused before anything is built or written, naming the holder
        refused = start(train_args(policy_dir, dataset_root, out, "--steps", LONG, *common), tmp_path)
        _, err = refused.communicate(timeout=120)
        assert refused.returncode == 2, err[-2000:]
        assert f"--output-dir {out.resolve()} is in use by another run: process {holder['pid']} on " \
               f"{holder['host']}, started {holder['started']}" in err and "Traceback" not in err
        assert a.poll() is None  # A trained on, undisturbed

        # B, requeued (--resume auto): waits while A holds the folder, then continues from A's checkpoint
        if processes == 2:
            extra["MASTER_PORT"] = str(free_port())  # its own rendezvous: A's is still in use
        waiting = start(train_args(policy_dir, dataset_root, out, "--steps", LONG, *common, "--resume", "auto"),
                        tmp_path, launcher, **extra)
        first = waiting.stdout.readline()
        while "launch.sh" in first or not first.strip():
            first = waiting.stdout.readline()
        assert first.startswith(f"waiting up to 300 s for the run holding {out.resolve()}"), first
        signal_every_process(a, signal.SIGUSR1)  # A is preempted: it saves and lets go
        _, a_err = a.communicate(timeout=300)
        assert a.returncode == 75, a_err[-3000:]
        stopped_at = max(losses(out))
        wait_until_training(waiting, out, step=stopped_at + 2)
        signal_every_process(waiting, signal.SIGUSR1)
        b_out, b_err = waiting.communicate(timeout=300)
        assert waiting.returncode == 75, b_err[-3000:]
    finally:
        stop(a)
        if waiting is not None:
            stop(waiting)
    assert "resuming from" in b_out, b_err[-3000:]
    assert max(losses(out)) > stopped_at + 1  # B trained on from A's checkpoint, in the same folder
    assert_no_step_logged_twice(out)


def test_kill_9_of_the_holder_leaves_no_stale_lock(policy_dir, dataset_root, tmp_path):
    out = tmp_path / "run"
    a = start(train_args(policy_dir, dataset_root, out, "--steps", "400", "--checkpoint.every", "2"), tmp_path)
    try:
        wait_until_training(a, out, step=3)
        while not (out / "checkpoints" / "last").exists():
            time.sleep(0.1)
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    finally:
        stop(a)
    assert read_holder(out)["pid"] == a.pid  # its lock file is still there; the kernel dropped the lock
    saved = ckpt.load_trainer_state(ckpt.resolve_last(out / "checkpoints"))["step"]
    began = time.monotonic()
    summary = train.main(train_args(policy_dir, dataset_root, out, "--steps", str(saved + 2), "--checkpoint.every",
                                    "2", "--resume", "--wait-for-lock", "0"))
    assert summary["checkpoint"].endswith(f"{saved + 2:06d}")
    assert time.monotonic() - began < 120
    assert read_holder(out)["pid"] == os.getpid()


def hold_in_subprocess(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder` until killed (prints 'held' once it does)."""
    code = ("import sys, time; from finetune.training.run_lock import RunLock; RunLock.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], env=env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_folder_is_refused_at_once_or_after_the_wait(tmp_path):
    folder = tmp_path / "run"
    other = hold_in_subprocess(folder)
    try:
        with pytest.raises(ValueError, match=rf"in use by another run: process {other.pid} on "):
            RunLock.acquire(folder)
        began = time.monotonic()
        with pytest.raises(ValueError, match=r"\(waited 1 s\)"):
            RunLock.acquire(folder, wait_s=1.0, poll_s=0.2)
        assert 0.9 < time.monotonic() - began < 10
    finally:
        other.kill()
        other.wait()
    lock = RunLock.acquire(folder)  # the holder is gone: taken at once
    again = RunLock.acquire(folder)  # re-entrant in one process (the demo holds it around its runs)
    assert again is lock and read_holder(folder)["pid"] == os.getpid()
    again.release()
    assert lock.fd is not None  # still held: released as often as acquired
    lock.release()
    assert lock.fd is None


def test_without_flock_a_heartbeat_file_holds_the_folder(tmp_path, monkeypatch, capsys):
    """A filesystem that answers flock with ENOLCK (some NFS mounts): the lock file's heartbeat holds the folder,
    processes that can flock respect it, and a holder that died is taken over."""
    folder = tmp_path / "run"
    folder.mkdir()  # the lock is taken in an existing folder, which stays after release

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    lock = RunLock.acquire(folder)
    assert "without file locks" in capsys.readouterr().err  # a warning
    assert read_holder(folder)["locking"] == "heartbeat"
    code = "import sys; from finetune.training.run_lock import RunLock; RunLock.acquire(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], env=env(), capture_output=True, text=True)
    assert proc.returncode != 0 and f"process {os.getpid()} on {socket.gethostname()}" in proc.stderr
    lock.release()
    assert not (folder / LOCK_FILE).exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "then", "locking": "heartbeat"}
    (folder / LOCK_FILE).write_text(json.dumps(stale))
    taken = RunLock.acquire(folder)  # its holder's PID is gone on this host
    assert read_holder(folder)["pid"] == os.getpid()
    taken.release()


def test_a_reader_keeps_its_checkpoint_from_being_pruned(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        (checkpoints / f"{step:06d}").mkdir(parents=True)
        (checkpoints / f"{step:06d}" / "adapter_model.safetensors").write_text(str(step))
    os.symlink("000004", checkpoints / "last")
    with reading_checkpoint(checkpoints / "last") as folder:
        assert folder == (checkpoints / "000004").resolve()
        (checkpoints / "000006").mkdir()  # the run saves step 6 and moves `last` while the reader loads step 4
        ckpt._point_last(checkpoints, "000006")
        ckpt._prune(checkpoints, keep_last=1)
        assert (folder / "adapter_model.safetensors").read_text() == "4"  # still there, never half-deleted
    ckpt._prune(checkpoints, keep_last=1)  # the next save prunes
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["000006"]
