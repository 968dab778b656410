"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_batch(policy, batch_size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = policy.config
    batch = {key: torch.rand(batch_size, *cfg.input_features[key]["shape"], generator=g) for key in cfg.image_features}
    batch["observation.state"] = torch.randn(batch_size, cfg.state_dim, generator=g)
    batch["observation.language.tokens"] = torch.randint(2, 500, (batch_size, 7), generator=g)
    mask = torch.ones(batch_size, 7, dtype=torch.bool)
    mask[0, 4:] = False  # one padded instruction
    batch["observation.language.attention_mask"] = mask
    batch["action"] = torch.randn(batch_size, cfg.chunk_size, cfg.action_dim, generator=g)
    pad = torch.zeros(batch_size, cfg.chunk_size, dtype=torch.bool)
    pad[1, -3:] = True
    batch["action_is_pad"] = pad
    return batch


def train_args(policy_dir: Path, dataset_root: Path, output_dir: Path, *extra: str) -> list[str]:
    """Arguments of a tiny, fast LoRA run (the smolvla_lora preset with small sizes)."""
    return [
        "smolvla_lora", "--policy.path", str(policy_dir), "--dataset.root", str(dataset_root),
        "--output-dir", str(output_dir), "--batch-size", "4", "--peft.r", "4", "--optim.warmup-steps", "2",
        "--log-every", "1", "--eval-every", "100", "--eval-batches", "1", "--dataset.eval-episodes", "2",
        "--checkpoint.every", "2", "--seed", "7", "--optim.decay-steps", "4", *extra,
    ]
