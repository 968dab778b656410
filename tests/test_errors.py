"""Every bad input ends in one line `error: ...` naming the file or field and the fix, exit status 2, no traceback.
One test per row of the table in docs/errors.md."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import train_args

from finetune import train


def refused(args: list[str], capsys) -> str:
    """Run train.main, expect exit 2 and exactly one error line on stderr; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def policy_copy(policy_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "policy"
    shutil.copytree(policy_dir, copy)
    return copy


def truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(int(path.stat().st_size * keep))


@pytest.fixture(scope="module")
def finished_run(policy_dir, dataset_root, tmp_path_factory) -> Path:
    """Two steps with a checkpoint after each (treat as read-only; tests damage copies)."""
    out = tmp_path_factory.mktemp("errors") / "run"
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "2", "--checkpoint.every", "1"))
    return out


def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy


# --- the policy folder ----------------------------------------------------------------------------------------------


def test_truncated_model_safetensors(policy_dir, dataset_root, tmp_path, capsys):
    policy = policy_copy(policy_dir, tmp_path)
    truncate(policy / "model.safetensors")
    err = refused(train_args(policy, dataset_root, tmp_path / "out", "--steps", "2"), capsys)
    assert err.startswith(f"error: {policy / 'model.safetensors'} is truncated or corrupt (")
    assert err.endswith("; copy or download the policy folder again")


def test_config_json_with_an_unknown_policy_type(policy_dir, dataset_root, tmp_path, capsys):
    policy = policy_copy(policy_dir, tmp_path)
    config = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**config, "type": "act"}))
    err = refused(train_args(policy, dataset_root, tmp_path / "out", "--steps", "2"), capsys)
    assert err == (f"error: {policy / 'config.json'}: field 'type' is 'act', not a policy this suite trains (pi0, "
                   "pi05, smolvla); point --policy.path at a SmolVLA, pi0 or pi0.5 folder")


def test_config_json_that_is_not_json(policy_dir, dataset_root, tmp_path, capsys):
    policy = policy_copy(policy_dir, tmp_path)
    truncate(policy / "config.json", 0.3)
    err = refused(train_args(policy, dataset_root, tmp_path / "out", "--steps", "2"), capsys)
    assert re.fullmatch(rf"error: {re.escape(str(policy / 'config.json'))} is not valid JSON \(.*\); copy the policy "
                        "folder again", err), err


def test_policy_folder_without_a_tokenizer(policy_dir, dataset_root, tmp_path, capsys):
    policy = policy_copy(policy_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (policy / name).unlink()
    err = refused(train_args(policy, dataset_root, tmp_path / "out", "--steps", "2"), capsys)
    assert err == ("error: no tokenizer: the VLM's tokenizer 'finetune/tiny-smolvlm' is neither a local folder nor in "
                   f"the Hugging Face cache (offline), and the policy folder {policy} has none (tokenizer.json and "
                   "tokenizer_config.json); copy the tokenizer files into the policy folder or pass "
                   "--policy.tokenizer-path FOLDER")


def test_a_chunk_size_that_cannot_fit_is_refused_before_allocating(policy_dir, dataset_root, tmp_path, capsys):
    import psutil

    err = refused(train_args(policy_dir, dataset_root, tmp_path / "out", "--steps", "2", "--policy.chunk-size",
                             "200000"), capsys)
    tokens = 200_000 + 16  # the tiny policy's tokenizer_max_length
    need = 4 * tokens * tokens * 4 / 2**30
    total = psutil.virtual_memory().total / 2**30
    assert err == (f"error: --policy.chunk-size 200000 needs at least {need:.1f} GiB for one micro-batch's attention "
                   f"scores (4 x {tokens}^2 tokens x 4 bytes), more than the {total:.1f} GiB of RAM; use the policy's "
                   "chunk size (50 for SmolVLA/pi0) or a smaller --batch-size")
    assert not (tmp_path / "out").exists()


# --- the output folder and the checkpoints ---------------------------------------------------------------------------


def test_output_dir_that_is_an_existing_file(policy_dir, dataset_root, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    err = refused(train_args(policy_dir, dataset_root, path, "--steps", "2"), capsys)
    assert err == f"error: --output-dir {path} is an existing file, not a folder; pass a folder path (it is created " \
                  "if missing)"
    assert path.read_text() == "mine\n"


def test_truncated_adapter_in_the_checkpoint_to_resume(finished_run, policy_dir, dataset_root, tmp_path, capsys):
    run = run_copy(finished_run, tmp_path)
    truncate(run / "checkpoints/000002/adapter_model.safetensors")
    err = refused(train_args(policy_dir, dataset_root, run, "--steps", "4", "--checkpoint.every", "1", "--resume"),
                  capsys)
    assert err.startswith(f"error: {run / 'checkpoints/000002/adapter_model.safetensors'} is truncated or corrupt (")
    assert err.endswith(f"the checkpoint is damaged; resume from the previous one: `ln -sfn 000001 "
                        f"{run / 'checkpoints/last'}` then --resume (or start a new --output-dir)")


def test_truncated_adapter_config_in_the_checkpoint(finished_run, policy_dir, dataset_root, tmp_path, capsys):
    run = run_copy(finished_run, tmp_path)
    truncate(run / "checkpoints/000002/adapter_config.json")
    err = refused(train_args(policy_dir, dataset_root, run, "--steps", "4", "--checkpoint.every", "1", "--resume"),
                  capsys)
    assert err.startswith(f"error: {run / 'checkpoints/000002/adapter_config.json'} cannot be read (JSONDecodeError)")
    assert "ln -sfn 000001" in err


def test_truncated_optimizer_state_in_the_checkpoint(finished_run, policy_dir, dataset_root, tmp_path, capsys):
    run = run_copy(finished_run, tmp_path)
    truncate(run / "checkpoints/000002/training_state/optimizer.safetensors")
    err = refused(train_args(policy_dir, dataset_root, run, "--steps", "4", "--checkpoint.every", "1", "--resume"),
                  capsys)
    assert err.startswith(f"error: {run / 'checkpoints/000002/training_state'}: the optimizer/scheduler state cannot "
                          "be loaded (")
    assert "ln -sfn 000001" in err


def test_unreadable_trainer_state_in_the_checkpoint(finished_run, policy_dir, dataset_root, tmp_path, capsys):
    run = run_copy(finished_run, tmp_path)
    (run / "checkpoints/000002/trainer_state.json").write_text('{"step": ')
    err = refused(train_args(policy_dir, dataset_root, run, "--steps", "4", "--resume"), capsys)
    assert err.startswith(f"error: {run / 'checkpoints/000002'}: train_config.json / trainer_state.json cannot be "
                          "read (JSONDecodeError); resume from the previous one: `ln -sfn 000001")


def _assert_checkpoint_failure_keeps_the_last_good_one(err: str, run: Path, reason: str) -> None:
    assert err.startswith(f"error: could not write the checkpoint of step 3 into {run / 'checkpoints'} ({reason}")
    assert err.endswith(f"the last good checkpoint {run / 'checkpoints/000002'} is kept (checkpoints/last points at "
                        "it). Free disk space or make the folder writable, then rerun with --resume")
    assert os.readlink(run / "checkpoints/last") == "000002"
    assert json.loads((run / "checkpoints/000002/trainer_state.json").read_text())["step"] == 2
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_read_only_checkpoint_folder_keeps_the_last_good_checkpoint(finished_run, policy_dir, dataset_root, tmp_path,
                                                                    capsys):
    run = run_copy(finished_run, tmp_path)
    folder = run / "checkpoints"
    # chattr +i: not even root may write there (chmod does not stop root, which CI containers often are)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("needs chattr +i (ext4 and CAP_LINUX_IMMUTABLE) to make a folder read-only for root")
    try:
        err = refused(train_args(policy_dir, dataset_root, run, "--steps", "3", "--checkpoint.every", "1",
                                 "--resume"), capsys)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    _assert_checkpoint_failure_keeps_the_last_good_one(err, run, "PermissionError: [Errno 1] Operation not permitted")
    assert "MiB free there" in err


def test_full_disk_keeps_the_last_good_checkpoint(finished_run, policy_dir, dataset_root, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    def pages(path: Path) -> int:  # tmpfs holds each file in whole 4 KiB pages
        return -(-path.stat().st_size // 4096) * 4096

    used = sum(pages(p) for p in finished_run.rglob("*") if p.is_file() and not p.is_symlink())
    checkpoint = sum(pages(p) for p in (finished_run / "checkpoints/000002").rglob("*") if p.is_file())
    size_kb = (used + checkpoint // 3) // 1024  # room for the run so far, not for one more checkpoint
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs mount (root with CAP_SYS_ADMIN) for a small tmpfs that fills up")
    try:
        run = run_copy(finished_run, disk)
        err = refused(train_args(policy_dir, dataset_root, run, "--steps", "3", "--checkpoint.every", "1",
                                 "--checkpoint.keep-last", "5", "--resume"), capsys)
        free = re.search(r"; ([0-9.]+) MiB free there\)", err)
        assert free and float(free.group(1)) < checkpoint / 2**20, err
        _assert_checkpoint_failure_keeps_the_last_good_one(err, run, "")
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
