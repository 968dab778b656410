"""Shared fixtures: a small synthetic LeRobot v3 dataset, tiny SmolVLA / pi0 / pi0.5 folders in LeRobot's format and
4-step LoRA runs of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> Path:
    from finetune.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data") / "reach"
    make_synthetic_dataset(root, num_episodes=10, target_colors=["red", "green"], episode_length=16, seed=0,
                           episodes_per_file=4)
    return root


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, dataset_root):
    """A function: policy type ("smolvla", "pi0", "pi05") -> that type's tiny policy folder in LeRobot's format,
    built on first use and shared by the session. Treat the folders as read-only."""
    from helpers import make_tiny_pi_policy

    from finetune.data import load_dataset_meta
    from finetune.demo import make_initial_policy

    folders: dict[str, Path] = {}

    def folder(policy_type: str) -> Path:
        if policy_type not in folders:
            meta = load_dataset_meta(dataset_root)
            path = tmp_path_factory.mktemp(policy_type) / f"tiny_{policy_type}"
            folders[policy_type] = (make_initial_policy(path, meta, seed=0) if policy_type == "smolvla"
                                    else make_tiny_pi_policy(path, meta, policy_type, seed=0))
        return folders[policy_type]

    return folder


@pytest.fixture(scope="session")
def policy_dir(tiny_policy) -> Path:
    return tiny_policy("smolvla")


@pytest.fixture(scope="session")
def straight_run(tiny_policy, dataset_root, tmp_path_factory):
    """A function: policy type -> (run folder, summary) of a straight 4-step LoRA run of its tiny policy
    (helpers.policy_train_args), run on first use and shared by the session. Treat the folders as read-only."""
    from helpers import policy_train_args

    from finetune import train

    runs: dict[str, tuple[Path, dict]] = {}

    def run(policy_type: str) -> tuple[Path, dict]:
        if policy_type not in runs:
            out = tmp_path_factory.mktemp(f"{policy_type}_straight") / "run"
            summary = train.main(policy_train_args(policy_type, tiny_policy(policy_type), dataset_root, out,
                                                   "--steps", "4"))
            runs[policy_type] = (out, summary)
        return runs[policy_type]

    return run


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, policy_dir, dataset_root) -> Path:
    """A finished 4-step LoRA run of the tiny SmolVLA (run folder with checkpoints/last, metrics.jsonl), shared by
    the merge, predict and eval tests. Treat it as read-only."""
    from helpers import train_args

    from finetune import train

    out = tmp_path_factory.mktemp("lora_run") / "run"
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "4"))
    return out
