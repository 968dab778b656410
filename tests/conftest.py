"""Shared fixtures: a small synthetic LeRobot v3 dataset and a tiny SmolVLA folder in LeRobot's format."""

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
def policy_dir(tmp_path_factory, dataset_root) -> Path:
    from finetune.data import load_dataset_meta
    from finetune.demo import make_initial_policy

    return make_initial_policy(tmp_path_factory.mktemp("policy") / "tiny_smolvla", load_dataset_meta(dataset_root),
                               seed=0)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, policy_dir, dataset_root) -> Path:
    """A finished 4-step LoRA run of the tiny SmolVLA (run folder with checkpoints/last, metrics.jsonl), shared by
    the merge, predict and eval tests. Treat it as read-only."""
    from helpers import train_args

    from finetune import train

    out = tmp_path_factory.mktemp("lora_run") / "run"
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "4"))
    return out
