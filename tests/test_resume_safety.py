"""--resume loads no pickles: the training state is safetensors + JSON, and a checkpoint that holds pickled state
(DeepSpeed's, an older format's, or one planted in a downloaded run folder) is refused unless the user trusts it.
The planted files would create a marker file if anything unpickled them."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import train_args
from safetensors.torch import load_file

from finetune import train
from finetune.training.state import sign_pickles, unsafe_files


class Payload:
    """Unpickling this opens (creates) the marker file: the stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(folder: Path, marker: Path) -> list[str]:
    names = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"]
    for name in names:
        with open(folder / name, "wb") as fh:
            pickle.dump({"state": Payload(marker)}, fh)
    torch.save({"ok": torch.zeros(2)}, folder / "plain_tensors.bin")  # plain tensors: readable without unpickling
    return names


def test_a_planted_pickle_is_never_unpickled_on_resume(policy_dir, dataset_root, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "2", "--checkpoint.every", "2"))
    state = out / "checkpoints" / "last" / "training_state"
    assert sorted(p.name for p in state.iterdir()) == ["optimizer.json", "optimizer.safetensors", "rng_0.json",
                                                      "rng_0.safetensors", "scheduler.json"]
    planted = plant(state, marker)
    assert sorted(unsafe_files(state)) == sorted(planted) and not marker.exists()

    summary = train.main(train_args(policy_dir, dataset_root, out, "--steps", "4", "--checkpoint.every", "2",
                                    "--resume"))  # the safe files are what is loaded
    assert summary["checkpoint"].endswith("000004") and not marker.exists()

    # a checkpoint whose state exists only as pickles (an older format, or DeepSpeed's): refused, naming them
    state = out / "checkpoints" / "last" / "training_state"
    for name in ("optimizer.safetensors", "scheduler.json"):
        (state / name).unlink()
    plant(state, marker)
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, dataset_root, out, "--steps", "6", "--checkpoint.every", "2", "--resume"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "custom_checkpoint_0.pkl" in err and "--checkpoint.trust-pickles" in err
    assert "plain_tensors.bin" not in err.split("hold Python objects")[0]
    assert not marker.exists()


def test_resume_from_the_safe_state_continues_exactly(policy_dir, dataset_root, tmp_path):
    """Optimizer moments, step counts, schedule and RNG restored from safetensors + JSON: the same adapter as one go,
    to the bit."""
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    common = ["--checkpoint.every", "2", "--peft.lora-dropout", "0.1"]  # dropout: the RNG state matters
    train.main(train_args(policy_dir, dataset_root, resumed, "--steps", "2", *common))
    train.main(train_args(policy_dir, dataset_root, resumed, "--steps", "4", *common, "--resume"))
    train.main(train_args(policy_dir, dataset_root, straight, "--steps", "4", *common))
    a = load_file(str(resumed / "checkpoints/000004/adapter_model.safetensors"))
    b = load_file(str(straight / "checkpoints/000004/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.getsize(resumed / "checkpoints/000004/training_state/optimizer.safetensors") > 0


class Settings:
    """Not a tensor: DeepSpeed's checkpoints hold objects like this, which only a full unpickle reads."""

    def __init__(self, value):
        self.value = value


def test_pickles_this_users_runs_signed_load_and_any_other_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CHECKPOINT_KEY_FILE", str(tmp_path / "key"))
    folder, marker = tmp_path / "training_state", tmp_path / "pwned"
    (folder / "pytorch_model").mkdir(parents=True)
    torch.save({"settings": Settings(3), "moments": torch.ones(2)}, folder / "pytorch_model" / "optim_states.pt")
    assert unsafe_files(folder) == ["pytorch_model/optim_states.pt"]  # unsigned: a full unpickle would be needed
    sign_pickles(folder)
    assert unsafe_files(folder) == []  # written and signed by this user's run: resumes as before
    with open(folder / "pytorch_model" / "optim_states.pt", "wb") as fh:  # replaced after signing
        pickle.dump(Payload(marker), fh)
    assert unsafe_files(folder) == ["pytorch_model/optim_states.pt"] and not marker.exists()
    sign_pickles(folder)  # signed with another user's key: not trusted here
    monkeypatch.setenv("FINETUNE_CHECKPOINT_KEY_FILE", str(tmp_path / "other_key"))
    assert unsafe_files(folder) == ["pytorch_model/optim_states.pt"] and not marker.exists()
