"""Preemption: SIGUSR1/SIGTERM mid-run -> the step finishes, a checkpoint is written, exit 75 (Ctrl-C: exit 130);
resuming from it reproduces an uninterrupted run (same losses, same adapter). One process, and two CPU processes under
DDP where only one rank gets the signal (both must stop at the same step). Signals go where clusters send them: to
the whole process group (data-loader workers and launchers included), as SLURM, `timeout` and Ctrl-C do."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import train_args
from safetensors.torch import load_file

from finetune import train
from finetune.training.metrics import read_metrics
from finetune.training.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parent.parent
LONG = "500"  # far more steps than run before the signal lands


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m}


def env(**extra: str) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PATH": path, "PYTHONPATH": str(REPO), **extra}


def wait_until_training(proc: subprocess.Popen, out: Path, step: int = 2, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and max(losses(out), default=0) >= step):
        assert proc.poll() is None, f"the run exited early ({proc.returncode})"
        assert time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.2)


def checkpoint_of_the_stop(out: Path) -> int:
    """The one checkpoint the stop wrote: its step, after checking it is complete and `last` points at it."""
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    state = json.loads((out / "checkpoints/last/trainer_state.json").read_text())
    step = state["step"]
    assert names == [f"{step:06d}", "last"] and os.readlink(out / "checkpoints/last") == f"{step:06d}"
    assert 2 <= step < int(LONG)
    assert max(losses(out)) == step  # nothing was logged after the checkpointed step
    assert load_file(str(out / "checkpoints/last/adapter_model.safetensors"))
    return step


def assert_same_run(resumed: Path, straight: Path, steps: int, loss_rel: float, adapter_tol: dict) -> None:
    ours, theirs = losses(resumed), losses(straight)
    assert sorted(ours) == list(range(1, steps + 1)) == sorted(theirs)
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=loss_rel, abs=1e-7), (step, ours, theirs)
    a = load_file(str(resumed / f"checkpoints/{steps:06d}/adapter_model.safetensors"))
    b = load_file(str(straight / f"checkpoints/{steps:06d}/adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 26
    for key in a:
        torch.testing.assert_close(a[key], b[key], **adapter_tol)


@pytest.mark.parametrize(("sig", "to_group"), [
    (signal.SIGUSR1, False),  # the main process alone
    (signal.SIGTERM, True),  # SLURM / timeout: every process of the group, data-loader workers included
    pytest.param(signal.SIGINT, True, marks=pytest.mark.slow),  # Ctrl-C in a terminal
    pytest.param(signal.SIGTERM, False, marks=pytest.mark.slow),
], ids=["SIGUSR1", "SIGTERM-group", "SIGINT-group", "SIGTERM"])
def test_a_signal_checkpoints_exits_75_and_the_resumed_run_matches(sig, to_group, policy_dir, dataset_root, tmp_path):
    out = tmp_path / "run"
    workers = ["--dataset.num-workers", "2"] if to_group else []
    args = train_args(policy_dir, dataset_root, out, "--steps", LONG, "--checkpoint.every", "1000", *workers)
    proc = subprocess.Popen([sys.executable, str(REPO / "finetune/train.py"), *args], env=env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until_training(proc, out)
        if to_group:
            import psutil

            assert len(psutil.Process(proc.pid).children()) >= 2  # the workers are there to receive it too
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    interrupted = sig == signal.SIGINT
    assert proc.returncode == (130 if interrupted else EXIT_PREEMPTED), stderr[-3000:]
    step = checkpoint_of_the_stop(out)
    said = "interrupted" if interrupted else "preempted"
    assert f"{said}: stopped by {sig.name} after step {step}; checkpoint {out / 'checkpoints' / f'{step:06d}'} " \
           "written; continue with --resume auto" in stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr

    train.main(train_args(policy_dir, dataset_root, out, "--steps", str(step + 2), "--checkpoint.every", "1000",
                          "--resume", "auto"))
    straight = tmp_path / "straight"
    train.main(train_args(policy_dir, dataset_root, straight, "--steps", str(step + 2), "--checkpoint.every", "1000"))
    assert_same_run(out, straight, step + 2, loss_rel=1e-5, adapter_tol={"rtol": 1e-5, "atol": 1e-7})


def _launch(args: list[str], tmp_path: Path, **extra_env: str) -> subprocess.Popen:
    from test_distributed import free_port

    return subprocess.Popen(["bash", str(REPO / "launch.sh"), "--config", "cpu_ddp", *args], cwd=tmp_path,
                            env=env(ACCELERATE_USE_CPU="true", MASTER_PORT=str(free_port()),
                                    FINETUNE_DIST_TIMEOUT_S="60", **extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_is_signalled_and_resume_through_launch_sh(policy_dir, dataset_root,
                                                                                    tmp_path):
    import psutil

    out = tmp_path / "run"
    common = ["--batch-size", "2", "--grad-accum-steps", "2", "--checkpoint.every", "1000"]
    proc = _launch(train_args(policy_dir, dataset_root, out, "--steps", LONG, *common), tmp_path)
    try:
        wait_until_training(proc, out)
        rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.environ().get("RANK") == "1" and "train.py" in " ".join(p.cmdline())]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGUSR1)  # rank 0 never gets it: the ranks must agree to stop
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        for child in psutil.Process().children(recursive=True):  # a rank left behind by a failed assertion
            if child.pid != os.getpid() and "train.py" in " ".join(child.cmdline()):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
    assert proc.returncode == EXIT_PREEMPTED, stderr[-4000:]
    assert "launch.sh: preempted; the checkpoint is written. Exit 75" in stderr
    assert "ChildFailedError" not in stderr and "Traceback" not in stderr
    step = checkpoint_of_the_stop(out)
    state_files = {p.name for p in (out / "checkpoints/last/training_state").iterdir()}
    assert {"rng_0.safetensors", "rng_1.safetensors", "optimizer.safetensors"} <= state_files  # both ranks saved
    assert json.loads((out / "checkpoints/last/trainer_state.json").read_text())["world_size"] == 2

    resumed = _launch(train_args(policy_dir, dataset_root, out, "--steps", str(step + 2), *common, "--resume", "auto"),
                      tmp_path)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-4000:]
    # the same global batch in one process (DDP over 2 ranks matches it to ~1e-7, see test_distributed.py)
    straight = tmp_path / "straight"
    train.main(train_args(policy_dir, dataset_root, straight, "--steps", str(step + 2), "--batch-size", "4",
                          "--grad-accum-steps", "2", "--checkpoint.every", "1000"))
    assert_same_run(out, straight, step + 2, loss_rel=1e-5, adapter_tol={"rtol": 1e-4, "atol": 1e-6})


@pytest.mark.parametrize("config", ["cpu", pytest.param("cpu_ddp", marks=pytest.mark.slow)])
def test_sigterm_to_the_group_through_launch_sh_checkpoints_and_exits_75(config, policy_dir, dataset_root, tmp_path):
    """launch.sh, accelerate's launcher (and torchrun for 2 processes), the ranks and their data-loader workers all
    get SIGTERM: the ranks save one checkpoint, and the job ends with 75 and no launcher traceback."""
    from test_distributed import free_port

    out = tmp_path / "run"
    ranks = 2 if config == "cpu_ddp" else 1
    args = train_args(policy_dir, dataset_root, out, "--steps", LONG, "--checkpoint.every", "1000",
                      "--dataset.num-workers", "1", "--batch-size", str(4 // ranks))
    extra = {"ACCELERATE_USE_CPU": "true", "MASTER_PORT": str(free_port()), "FINETUNE_DIST_TIMEOUT_S": "60"}
    proc = subprocess.Popen(["bash", str(REPO / "launch.sh"), "--config", config, *args], cwd=tmp_path,
                            env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until_training(proc, out)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-4000:]
    assert "launch.sh: preempted; the checkpoint is written. Exit 75" in stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr[-4000:]
    checkpoint_of_the_stop(out)
    assert json.loads((out / "checkpoints/last/trainer_state.json").read_text())["world_size"] == ranks


def test_a_bad_flag_under_launch_sh_is_one_line_and_exit_2(policy_dir, dataset_root, tmp_path):
    """Through accelerate's launcher too: the project's line and exit status, no launcher traceback."""
    for bad in (["--steps", "0"], ["--steps", "many"]):  # refused by validation; by the parser
        proc = subprocess.run(["bash", str(REPO / "launch.sh"), "--config", "cpu",
                               *train_args(policy_dir, dataset_root, tmp_path / "run", *bad)],
                              cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr, proc.stderr[-3000:]
    assert "error: --steps must be >= 1, got 0" in subprocess.run(
        ["bash", str(REPO / "launch.sh"), "--config", "cpu", *train_args(policy_dir, dataset_root, tmp_path / "r",
                                                                          "--steps", "0")],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=180).stderr


def test_sigterm_to_the_group_under_plain_accelerate_launch_still_checkpoints(policy_dir, dataset_root, tmp_path):
    """The README's `accelerate launch` (not launch.sh): accelerate's launcher takes SIGTERM itself, passes it on and
    gives its child 5 s before SIGKILL, then exits 143. The run, signalled twice, finishes its step, saves within
    that time (a small checkpoint) and says how to resume; its workers leave the signal to it. launch.sh is what
    lets a long save finish and turns a preemption into exit 75 for a cluster's requeue."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs/cpu.yaml"), str(REPO / "finetune/train.py"),
           *train_args(policy_dir, dataset_root, out, "--steps", LONG, "--checkpoint.every", "1000",
                       "--dataset.num-workers", "1")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until_training(proc, out)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=180)  # until the run, which holds the pipe too, has exited
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "continue with --resume auto" in stderr and "DataLoader worker" not in stderr, stderr[-4000:]
    checkpoint_of_the_stop(out)
