"""Between the dataset and the policy: key renaming, normalization, tokenization, batching.

The policy sees normalized state/actions and token ids; the robot sees actions in its own units. Stats come from the
dataset's meta/stats.json at training time and travel with every checkpoint (normalization_stats.safetensors).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from finetune.policies.base import (
    ACTION,
    ACTION_IS_PAD,
    LANG_MASK,
    LANG_TOKENS,
    OBS_IMAGES_PREFIX,
    OBS_STATE,
    TASK,
    PolicyConfig,
)
from finetune.policies.relative_actions import RAW_STATE, config_mask, to_absolute, to_relative, uses_relative_actions

STATS_FILE = "normalization_stats.safetensors"
EPS = 1e-8


def feature_kind(config: PolicyConfig, key: str) -> str:
    if key in config.output_features:
        return config.output_features[key]["type"]
    return config.input_features[key]["type"]


class Normalizer:
    """Per-feature normalization with LeRobot's modes: MEAN_STD, MIN_MAX, QUANTILES (q01/q99), IDENTITY."""

    def __init__(self, stats: Mapping[str, Mapping[str, Any]], mapping: Mapping[str, str], config: PolicyConfig):
        self.stats = {k: {s: torch.as_tensor(np.asarray(v), dtype=torch.float32) for s, v in d.items()}
                      for k, d in stats.items()}
        self.mapping = dict(mapping)
        self.config = config
        for key in (OBS_STATE, ACTION):
            mode = self.mode(key)
            if mode != "IDENTITY":
                needed = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99")}[mode]
                have = self.stats.get(key, {})
                if not all(n in have for n in needed):
                    raise ValueError(f"normalization stats for {key!r} lack {needed} (found {sorted(have)}); "
                                     "check the dataset's meta/stats.json")

    def mode(self, key: str) -> str:
        return self.mapping.get(feature_kind(self.config, key), "IDENTITY")

    def normalize(self, key: str, x: Tensor) -> Tensor:
        mode, s = self.mode(key), self.stats.get(key, {})
        if mode == "MEAN_STD":
            return (x - s["mean"].to(x)) / (s["std"].to(x) + EPS)
        if mode == "MIN_MAX":
            return 2 * (x - s["min"].to(x)) / (s["max"].to(x) - s["min"].to(x) + EPS) - 1
        if mode == "QUANTILES":
            return 2 * (x - s["q01"].to(x)) / (s["q99"].to(x) - s["q01"].to(x) + EPS) - 1
        return x

    def unnormalize(self, key: str, x: Tensor) -> Tensor:
        mode, s = self.mode(key), self.stats.get(key, {})
        if mode == "MEAN_STD":
            return x * (s["std"].to(x) + EPS) + s["mean"].to(x)
        if mode == "MIN_MAX":
            return (x + 1) / 2 * (s["max"].to(x) - s["min"].to(x) + EPS) + s["min"].to(x)
        if mode == "QUANTILES":
            return (x + 1) / 2 * (s["q99"].to(x) - s["q01"].to(x) + EPS) + s["q01"].to(x)
        return x


def save_stats(stats: Mapping[str, Mapping[str, Any]], folder: str | Path) -> Path:
    """Flattened `<feature>.<stat>` tensors, the layout of LeRobot's normalizer state files."""
    flat = {f"{k}.{s}": torch.as_tensor(np.asarray(v), dtype=torch.float32).contiguous()
            for k, d in stats.items() for s, v in d.items() if s != "count"}
    path = Path(folder) / STATS_FILE
    save_file(flat, str(path))
    return path


def load_stats(folder: str | Path) -> dict[str, dict[str, Tensor]]:
    path = Path(folder) / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint has no normalization stats")
    out: dict[str, dict[str, Tensor]] = {}
    for name, tensor in load_file(str(path)).items():
        key, stat = name.rsplit(".", 1)
        out.setdefault(key, {})[stat] = tensor
    return out


def image_keys(batch: Mapping[str, Any]) -> list[str]:
    """The camera images of a batch (tensors under observation.images.*), in a fixed order."""
    return sorted(k for k, v in batch.items() if k.startswith(OBS_IMAGES_PREFIX) and isinstance(v, Tensor))


def images_to_float(batch: dict[str, Any]) -> dict[str, Any]:
    """uint8 camera images (as the training DataLoader carries them, 4x fewer bytes) -> float32 in [0, 1], on
    whatever device they are; float images pass unchanged. The policy resizes and scales them to [-1, 1] itself."""
    for key in image_keys(batch):
        if batch[key].dtype == torch.uint8:
            batch[key] = batch[key].float().div_(255)
    return batch


class PolicyProcessor:
    """Turns dataset samples into policy batches (a DataLoader collate_fn) and policy actions into robot units."""

    def __init__(self, config: PolicyConfig, tokenizer: Any, stats: Mapping[str, Mapping[str, Any]],
                 rename_map: Mapping[str, str] | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.normalizer = Normalizer(stats, config.normalization_mapping, config)
        self.rename_map = dict(rename_map or {})

    def tokenize(self, tasks: list[str], state: Tensor | None = None) -> dict[str, Tensor]:
        """Tokenize the policy's prompts: its config builds them from the tasks and the normalized state."""
        prompts = self.config.build_prompts(tasks, state)
        padding = getattr(self.config, "pad_language_to", "max_length")
        enc = self.tokenizer(prompts, padding=padding, padding_side="right", truncation=True,
                             max_length=self.config.tokenizer_max_length, return_tensors="pt")
        return {LANG_TOKENS: enc["input_ids"], LANG_MASK: enc["attention_mask"].bool()}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in samples[0]:
            name = self.rename_map.get(key, key)
            values = [s[key] for s in samples]
            if isinstance(values[0], Tensor):
                batch[name] = torch.stack(values)
            elif isinstance(values[0], (int, float, bool, np.number)):
                batch[name] = torch.as_tensor(values)
            else:
                batch[name] = values
        return self.prepare(batch)

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Normalize state (and action when present) and tokenize the policy's prompts."""
        if OBS_STATE not in batch:
            raise ValueError(f"the batch has no {OBS_STATE!r}; it has {sorted(batch)}. Map it with "
                             "--dataset.rename-map")
        expected = self.config.state_dim
        if batch[OBS_STATE].shape[-1] != expected:
            raise ValueError(f"state has {batch[OBS_STATE].shape[-1]} dims, the policy expects {expected}")
        if uses_relative_actions(self.config):  # the policy sees actions minus the chunk's first state
            batch[RAW_STATE] = batch[OBS_STATE].float()
            if ACTION in batch:
                batch[ACTION] = to_relative(batch[ACTION].float(), batch[RAW_STATE], config_mask(self.config))
        batch[OBS_STATE] = self.normalizer.normalize(OBS_STATE, batch[OBS_STATE].float())
        if ACTION in batch:
            batch[ACTION] = self.normalizer.normalize(ACTION, batch[ACTION].float())
        if ACTION_IS_PAD in batch:
            batch[ACTION_IS_PAD] = batch[ACTION_IS_PAD].bool()
        tasks = batch.get(TASK) or [""] * batch[OBS_STATE].shape[0]
        batch.update(self.tokenize(list(tasks), batch[OBS_STATE]))  # after normalization: pi0.5 bins it
        return batch

    def unnormalize_actions(self, actions: Tensor, state: Tensor | None = None) -> Tensor:
        """Policy outputs in robot units; a relative-action policy needs the (unnormalized) state they start from."""
        actions = self.normalizer.unnormalize(ACTION, actions)
        if not uses_relative_actions(self.config):
            return actions
        if state is None:
            raise ValueError("this policy predicts relative actions: pass the robot state (batch[RAW_STATE]) to make "
                             "them absolute")
        return to_absolute(actions, state, config_mask(self.config))
