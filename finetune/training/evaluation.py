"""Held-out action MSE during training: fixed batches from the held-out episodes, sampled with fixed noise, the same
figure whatever the number of processes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from finetune.adapters import base_policy
from finetune.data import LeRobotDataset
from finetune.policies.base import ACTION, ACTION_IS_PAD
from finetune.policies.processor import PolicyProcessor, images_to_float
from finetune.training import distributed as dist
from finetune.training.ema import EMA


@dataclass
class EvalBatch:
    """This rank's rows of one fixed held-out batch: `size` rows in the global batch, `rows` of them held here
    (images as uint8), weighted by `weight` (0 for a rank left without rows: it still runs the forward pass)."""

    size: int
    rows: list[int]
    weight: float
    batch: dict[str, Any]


def fixed_eval_batches(dataset: LeRobotDataset, processor: PolicyProcessor, batch_size: int, count: int,
                       accelerator: Accelerator | None = None) -> list[EvalBatch]:
    """A fixed, evenly spread subset of held-out frames, so every evaluation sees the same inputs; each rank reads
    and keeps only its own rows of each global batch."""
    n = min(len(dataset), batch_size * count)
    indices = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()
    out = []
    for s in range(0, n, batch_size):
        chunk = indices[s : s + batch_size]
        if accelerator is None:
            rows, weight = list(range(len(chunk))), 1.0
        else:
            rows, weight = dist.eval_rows(len(chunk), accelerator)
        out.append(EvalBatch(len(chunk), rows, weight, processor([dataset[chunk[r]] for r in rows])))
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def heldout_mse(model: nn.Module, accelerator: Accelerator, batches: Sequence[EvalBatch], sources: Sequence[str] = (),
                ema: EMA | None = None, seed: int = 0) -> tuple[float | None, dict[str, float]]:
    """Held-out action MSE (normalized units, real action dims, in-episode steps) with the EMA weights when given,
    and per dataset when `sources` names each batch's dataset.

    Every rank evaluates its own rows of each fixed batch and the sums are reduced: the figure is computed once and
    returned on the main process only (None elsewhere).
    """
    if not batches:
        return None, {}
    if ema is not None:
        with ema.applied():
            return _heldout_mse(model, accelerator, batches, sources, seed)
    return _heldout_mse(model, accelerator, batches, sources, seed)


@torch.no_grad()
def _heldout_mse(model: nn.Module, accelerator: Accelerator, batches: Sequence[EvalBatch], sources: Sequence[str],
                 seed: int) -> tuple[float | None, dict[str, float]]:
    policy = accelerator.unwrap_model(model)
    was_training = policy.training
    policy.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = torch.zeros(2, dtype=torch.float64)  # squared error, element count
    names = list(dict.fromkeys(sources))
    per_dataset = torch.zeros(len(names), 2, dtype=torch.float64)
    cfg = base_policy(policy).config
    for index, held in enumerate(batches):
        noise = torch.randn(held.size, cfg.chunk_size, cfg.max_action_dim, generator=generator)
        mine = images_to_float(to_device(held.batch, accelerator.device))  # a copy: the kept batch stays uint8
        with dist.autocast(accelerator):
            pred = policy.predict_action_chunk(mine, noise=noise[held.rows].to(accelerator.device))
        valid = (~mine[ACTION_IS_PAD]).unsqueeze(-1).float() * held.weight
        batch_sums = torch.tensor([(((pred.float() - mine[ACTION]) ** 2) * valid).sum().item(),
                                   valid.sum().item() * pred.shape[-1]], dtype=torch.float64)
        sums += batch_sums
        if names:
            per_dataset[names.index(sources[index])] += batch_sums
    policy.train(was_training)
    sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    by_dataset = {}
    if names:
        per_dataset = accelerator.reduce(per_dataset.to(accelerator.device), reduction="sum").cpu()
        by_dataset = {f"eval/action_mse/{name}": (se / n.clamp_min(1)).item() for name, (se, n) in
                      zip(names, per_dataset)}
    return ((sums[0] / sums[1].clamp_min(1)).item() if accelerator.is_main_process else None), by_dataset
