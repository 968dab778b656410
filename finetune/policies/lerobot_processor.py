"""LeRobot 0.6's processor files: the normalization stats (and tokenizer settings) in the layout its policies load.

LeRobot saves a policy's input and output pipelines beside `config.json`:

    policy_preprocessor.json                                        steps (registry name + config), in order
    policy_preprocessor_step_<i>_normalizer_processor.safetensors   state of the stateful step i (flat `<key>.<stat>`)
    policy_postprocessor.json
    policy_postprocessor_step_0_unnormalizer_processor.safetensors

The step lists below follow LeRobot's `make_<policy>_pre_post_processors` (smolvla, pi0, pi05), so its
`PolicyProcessorPipeline.from_pretrained` rebuilds the same pipelines. This module also reads the stats back, so a
LeRobot-trained checkpoint (which has no normalization_stats.safetensors) gives its stats to finetune.inference.predict.

The tokenizer step's `tokenizer_name` goes to `AutoTokenizer.from_pretrained` as it is (LeRobot 0.6.1): a Hub id, or
a path, which resolves against the working directory, never against the processor file. So it names what LeRobot
itself writes (SmolVLA: its `vlm_model_name`; pi0/pi0.5: the PaliGemma tokenizer), or an absolute path to a local
tokenizer folder (see finetune.export.lerobot_vlm for exports of custom backbones).
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
EPS = 1e-8  # LeRobot's normalizer default (the same as finetune.policies.processor.EPS)


def _step(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"registry_name": name, "config": config or {}}


def _features(features: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {"type": f["type"], "shape": list(f["shape"])} for k, f in features.items()}


def _tokenizer_step(config: PolicyConfig, tokenizer_name: str | None, padding: str) -> dict[str, Any]:
    step = _step("tokenizer_processor", {"max_length": config.tokenizer_max_length, "task_key": "task",
                                         "padding_side": "right", "padding": padding, "truncation": True})
    if tokenizer_name is not None:
        step["config"]["tokenizer_name"] = tokenizer_name
    return step


def read_tokenizer_name(folder: str | Path) -> str | None:
    """The tokenizer step's `tokenizer_name` in `folder`'s policy_preprocessor.json, None when there is none."""
    path = Path(folder) / f"{PREPROCESSOR}.json"
    if not path.is_file():
        return None
    steps = json.loads(path.read_text()).get("steps", [])
    return next((s["config"].get("tokenizer_name") for s in steps if s.get("registry_name") == "tokenizer_processor"),
                None)


def set_tokenizer_name(folder: str | Path, tokenizer_name: str) -> None:
    """Point the tokenizer step of `folder`'s policy_preprocessor.json at `tokenizer_name`."""
    path = Path(folder) / f"{PREPROCESSOR}.json"
    data = json.loads(path.read_text())
    for step in data["steps"]:
        if step.get("registry_name") == "tokenizer_processor":
            step["config"]["tokenizer_name"] = tokenizer_name
            step.pop("artifacts", None)  # written by earlier versions; LeRobot reads no such key
    path.write_text(json.dumps(data, indent=2) + "\n")


def lerobot_tokenizer_name(config: PolicyConfig, base_dir: str | Path | None = None) -> str | None:
    """The tokenizer name LeRobot should load for a policy trained from `base_dir`.

    SmolVLA: its `vlm_model_name` (LeRobot's rule). pi0/pi0.5: the base's own tokenizer name when its processor files
    give one (a relative one made absolute against the base folder), else the PaliGemma tokenizer LeRobot names.
    """
    if config.type == "smolvla":
        return getattr(config, "vlm_model_name", None)
    name = read_tokenizer_name(base_dir) if base_dir is not None else None
    if name is not None and not Path(name).is_absolute() and (Path(base_dir) / name).is_dir():
        return str((Path(base_dir) / name).resolve())
    return name or config.tokenizer_name


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

    `tokenizer_name`: what LeRobot's tokenizer step loads (a Hub id or an absolute path; see lerobot_tokenizer_name).
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


def read_rename_map(folder: str | Path) -> dict[str, str]:
    """The rename step's map in `folder`'s policy_preprocessor.json ({} when there is none)."""
    path = Path(folder) / f"{PREPROCESSOR}.json"
    if not path.is_file():
        return {}
    steps = json.loads(path.read_text()).get("steps", [])
    return next((dict(s["config"].get("rename_map", {})) for s in steps
                 if s.get("registry_name") == "rename_observations_processor"), {})


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
