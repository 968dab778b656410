"""The optimizer and LeRobot's learning-rate schedule (cosine decay with warmup, stepped per optimizer update)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from finetune.config import TrainConfig


def get_lr_factor(step: int, warmup_steps: int, decay_steps: int, peak_lr: float, decay_lr: float) -> float:
    """LeRobot's cosine-decay-with-warmup schedule as a multiplier of the peak lr, for optimizer update `step`."""
    if step < warmup_steps:
        if step <= 0:
            return 1 / (warmup_steps + 1)
        frac = 1 - step / warmup_steps
        return (1 / (warmup_steps + 1) - 1) * frac + 1
    progress = min(step, decay_steps) / max(1, decay_steps)
    alpha = decay_lr / peak_lr
    return (1 - alpha) * 0.5 * (1 + math.cos(math.pi * progress)) + alpha


def build_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter]
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trained parameters and its schedule (decaying over --optim.decay-steps, else the whole run)."""
    o = cfg.optim
    # foreach: batched updates over all tensors; torch picks it by default on CUDA only, CPU runs a per-tensor loop
    optimizer = torch.optim.AdamW(list(params), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  foreach=True)
    decay_steps = o.decay_steps or cfg.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: get_lr_factor(s, o.warmup_steps, decay_steps, o.lr, o.decay_lr))
    return optimizer, scheduler
