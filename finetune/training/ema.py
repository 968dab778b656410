"""Exponential moving average of the trained weights (`--ema.decay`), adapter-only like the rest of a checkpoint.

After every optimizer update: shadow <- decay * shadow + (1 - decay) * weight, for the trained parameters only (the
adapter and PEFT's fully trained modules; the frozen base never changes). A checkpoint holds

    ema_state.safetensors   the shadow by parameter name, float32 (what --resume restores, so resume stays exact)
    ema/                    the shadow as a loadable adapter (adapter_model.safetensors + adapter_config.json, or a
                            whole policy for --peft.method FULL), what merge and predict use by default

This module imports no training code: merge and predict read checkpoints through `weights_folder`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

EMA_STATE_FILE = "ema_state.safetensors"
EMA_DIR = "ema"


class EMA:
    """The shadow copy of a model's trainable parameters."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average; call after each optimizer update."""
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)  # s + (1 - d) (p - s)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model computes with the shadow weights inside the block; its own weights come back after."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(saved[name])

    def save(self, folder: Path, write_weights: Callable[[Path], None]) -> None:
        """ema_state.safetensors (for resume) and ema/ written by `write_weights` with the shadow swapped in."""
        save_file({n: t.contiguous() for n, t in self.shadow.items()}, str(folder / EMA_STATE_FILE),
                  metadata={"decay": str(self.decay), "updates": str(self.updates)})
        with self.applied():
            write_weights(folder / EMA_DIR)

    def load(self, folder: Path) -> bool:
        """Restore the shadow saved in `folder`; False when it holds none (the run had no EMA until now)."""
        path = folder / EMA_STATE_FILE
        if not path.is_file():
            return False
        saved = load_file(str(path))
        if saved.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - saved.keys()), sorted(saved.keys() - self.shadow.keys())
            raise ValueError(f"{path} does not match the trained parameters (missing {missing[:3]}, unexpected "
                             f"{extra[:3]}); resume with the run's own options")
        for name, tensor in saved.items():
            self.shadow[name].copy_(tensor)
        with safe_open(str(path), "pt") as f:  # the update count lives in the file's metadata
            self.updates = int((f.metadata() or {}).get("updates", 0))
        return True


def has_ema(checkpoint: Path) -> bool:
    return (Path(checkpoint) / EMA_DIR).is_dir()


def weights_folder(checkpoint: Path, use_ema: bool | None) -> Path:
    """Where a checkpoint's weights to use live: its ema/ folder when present (unless use_ema is False), else itself.
    use_ema True on a checkpoint without EMA weights is an error."""
    checkpoint = Path(checkpoint)
    if use_ema is False or (use_ema is None and not has_ema(checkpoint)):
        return checkpoint
    if not has_ema(checkpoint):
        raise FileNotFoundError(f"{checkpoint} has no EMA weights ({EMA_DIR}/): the run trained without --ema.decay; "
                                "drop --use-ema")
    return checkpoint / EMA_DIR
