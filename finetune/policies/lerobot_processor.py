"""LeRobot 0.6's processor files: the normalization stats (and tokenizer settings) in the layout its policies load.

LeRobot saves a policy's input and output pipelines beside `config.json`:

    policy_preprocessor.json                                        steps (registry name + config), in order
    policy_preprocessor_step_<i>_normalizer_processor.safetensors   state of the stateful step i (flat `<key>.<stat>`)
    policy_postprocessor.json
    policy_postprocessor_step_0_unnormalizer_processor.safetensors
    tokenizer/                                                      the tokenizer step's saved tokenizer (artifact)

The step lists below follow LeRobot's `make_<policy>_pre_post_processors` (smolvla, pi0, pi05), so its
`PolicyProcessorPipeline.from_pretrained` rebuilds the same pipelines. This module also reads the stats back, so a
LeRobot-trained checkpoint (which has no normalization_stats.safetensors) gives its stats to finetune.inference.predict.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from finetune.policies.base import PolicyConfig

PREPROCESSOR = "policy_preprocessor"
POSTPROCESSOR = "policy_postprocessor"
TOKENIZER_ARTIFACT = "tokenizer"
EPS = 1e-8  # LeRobot's normalizer default (the same as finetune.policies.processor.EPS)


def _step(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"registry_name": name, "config": config or {}}


def _features(features: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {"type": f["type"], "shape": list(f["shape"])} for k, f in features.items()}


def _tokenizer_step(config: PolicyConfig, tokenizer_name: str | None, padding: str) -> dict[str, Any]:
    step = _step("tokenizer_processor", {"max_length": config.tokenizer_max_length, "task_key": "task",
                                         "padding_side": "right", "padding": padding, "truncation": True})
    if tokenizer_name == TOKENIZER_ARTIFACT:  # saved beside the files: LeRobot resolves it relative to them
        step["config"]["tokenizer_name"] = TOKENIZER_ARTIFACT
        step["artifacts"] = {"tokenizer_name": TOKENIZER_ARTIFACT}
    elif tokenizer_name is not None:
        step["config"]["tokenizer_name"] = tokenizer_name
    return step


def pipeline_steps(config: PolicyConfig, rename_map: Mapping[str, str], tokenizer_name: str | None
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(preprocessor steps, postprocessor steps) as LeRobot builds them for this policy type, without state files."""
    norm_map = dict(config.normalization_mapping)
    normalize = _step("normalizer_processor", {
        "eps": EPS, "features": _features({**config.input_features, **config.output_features}), "norm_map": norm_map})
    unnormalize = _step("unnormalizer_processor", {
        "eps": EPS, "features": _features(config.output_features), "norm_map": norm_map})
    rename = _step("rename_observations_processor", {"rename_map": dict(rename_map)})
    batch = _step("to_batch_processor")
    device = _step("device_processor", {"device": config.device or "cpu", "float_dtype": None})
    to_cpu = _step("device_processor", {"device": "cpu", "float_dtype": None})
    if config.type == "smolvla":
        pre = [rename, batch, _step("smolvla_new_line_processor"),
               _tokenizer_step(config, tokenizer_name, getattr(config, "pad_language_to", "longest")), device,
               normalize]
        return pre, [unnormalize, to_cpu]
    enabled = bool(getattr(config, "use_relative_actions", False))
    relative = _step("relative_actions_processor", {
        "enabled": enabled, "exclude_joints": list(getattr(config, "relative_exclude_joints", []) if enabled else []),
        "action_names": getattr(config, "action_feature_names", None) if enabled else None})
    absolute = _step("absolute_actions_processor", {"enabled": enabled})
    if config.type == "pi0":
        pre = [rename, batch, _step("pi0_new_line_processor"), _tokenizer_step(config, tokenizer_name, "max_length"),
               device, relative, normalize]
    elif config.type == "pi05":
        pre = [rename, batch, relative, normalize, _step("pi05_prepare_state_tokenizer_processor_step"),
               _tokenizer_step(config, tokenizer_name, "max_length"), device]
    else:  # LeRobot's default scaffold
        pre = [rename, batch, device, normalize]
    return pre, [unnormalize, absolute, to_cpu]


def flat_stats(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    return {f"{k}.{s}": torch.as_tensor(np.asarray(v), dtype=torch.float32).contiguous()
            for k, d in stats.items() for s, v in d.items() if s != "count"}


def write_processor_files(folder: str | Path, config: PolicyConfig, stats: Mapping[str, Mapping[str, Any]], *,
                          rename_map: Mapping[str, str] | None = None, tokenizer_name: str | None = None) -> list[Path]:
    """Write policy_preprocessor.json / policy_postprocessor.json and the (un)normalizer state files.

    `tokenizer_name`: "tokenizer" when the tokenizer was saved in `folder/tokenizer`, else a Hub id (or None).
    """
    folder = Path(folder)
    written = []
    state = flat_stats(stats)
    for name, steps in zip((PREPROCESSOR, POSTPROCESSOR), pipeline_steps(config, rename_map or {}, tokenizer_name)):
        for index, step in enumerate(steps):
            if step["registry_name"] in ("normalizer_processor", "unnormalizer_processor"):
                step["state_file"] = f"{name}_step_{index}_{step['registry_name']}.safetensors"
                save_file(state, str(folder / step["state_file"]))
                written.append(folder / step["state_file"])
        path = folder / f"{name}.json"
        path.write_text(json.dumps({"name": name, "steps": steps}, indent=2) + "\n")
        written.append(path)
    return written


def read_processor_stats(folder: str | Path) -> dict[str, dict[str, torch.Tensor]] | None:
    """The normalizer's stats from LeRobot's processor files in `folder`, or None when there are none."""
    folder = Path(folder)
    for name, step_name in ((PREPROCESSOR, "normalizer_processor"), (POSTPROCESSOR, "unnormalizer_processor")):
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        for step in json.loads(path.read_text()).get("steps", []):
            if step.get("registry_name") == step_name and step.get("state_file"):
                out: dict[str, dict[str, torch.Tensor]] = {}
                for key, tensor in load_file(str(folder / step["state_file"])).items():
                    feature, stat = key.rsplit(".", 1)
                    out.setdefault(feature, {})[stat] = tensor
                return out
    return None
