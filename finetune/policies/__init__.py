"""Policy registry and LeRobot-format folders (config.json + model.safetensors).

A LeRobot policy folder loads as it is: `config.json` gives `"type"` and the fields, `model.safetensors` the weights
with LeRobot's keys. What LeRobot fetches from the Hub at load time (the VLM architecture and tokenizer) comes from
the folder, a given local path, or the built-in table of known architectures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from finetune.policies.base import PolicyConfig
from finetune.policies.pi0 import PI0Config, PI0Policy
from finetune.policies.pi05 import PI05Config, PI05Policy
from finetune.policies.smolvla import SmolVLAConfig, SmolVLAPolicy, make_vlm_config

POLICIES: dict[str, type[nn.Module]] = {"smolvla": SmolVLAPolicy, "pi0": PI0Policy, "pi05": PI05Policy}
VLM_CONFIG_FILE = "vlm_config.json"  # the backbone architecture, for backbones not in the built-in table
# Keys of older LeRobot checkpoints that hold normalization buffers: the stats live beside the model here.
_IGNORED_KEY_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")


def policy_class(policy_type: str) -> type[nn.Module]:
    if policy_type not in POLICIES:
        raise ValueError(f"unknown policy type {policy_type!r}; available: {sorted(POLICIES)}")
    return POLICIES[policy_type]


def config_from_dict(data: dict[str, Any]) -> PolicyConfig:
    if "type" not in data:
        raise ValueError("policy config.json has no 'type' field (expected e.g. \"smolvla\")")
    return policy_class(data["type"]).config_class.from_dict(data)


def make_policy(config: PolicyConfig, backbone_config: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialized policy (use `torch.device("meta")` as a context to build without memory).

    `backbone_config` is what vlm_config.json holds for a backbone not built in; None builds the one the config names
    (SmolVLM2-500M for SmolVLA, PaliGemma 3B + Gemma 300M for pi0/pi0.5).
    """
    cls = policy_class(config.type)
    if cls is SmolVLAPolicy:  # takes a transformers SmolVLMConfig
        return cls(config, make_vlm_config(config.vlm_model_name, backbone_config))
    return cls(config, backbone_config)


def backbone_config_dict(policy: nn.Module) -> dict[str, Any] | None:
    """The backbone architecture to store beside config.json, or None when it is a built-in one."""
    if isinstance(policy, SmolVLAPolicy):
        from finetune.policies.smolvla import KNOWN_VLM_CONFIGS

        if policy.config.vlm_model_name in KNOWN_VLM_CONFIGS:
            return None
        return policy.vlm_config.to_dict()
    to_dict = getattr(policy, "backbone_config_dict", None)
    return to_dict() if to_dict is not None else None


def save_policy(policy: nn.Module, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json and model.safetensors in LeRobot's format (plus vlm_config.json for custom backbones)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policy.config.save(folder)
    backbone = backbone_config_dict(policy)
    if backbone is not None:
        (folder / VLM_CONFIG_FILE).write_text(json.dumps(backbone, indent=2) + "\n")
    state_dict = policy.state_dict() if state_dict is None else state_dict
    # safetensors refuses tensors that share memory; clone makes each one its own.
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def load_policy_config(folder: str | Path) -> PolicyConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a policy folder needs config.json and model.safetensors")
    return config_from_dict(json.loads(path.read_text()))


def load_policy(folder: str | Path, dtype: torch.dtype | None = None, **config_overrides: Any) -> nn.Module:
    """Build the policy described by `folder/config.json` and load `folder/model.safetensors` into it."""
    folder = Path(folder)
    config = load_policy_config(folder)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{config.type} config has no field {key!r}")
        setattr(config, key, value)
    backbone_path = folder / VLM_CONFIG_FILE
    backbone = json.loads(backbone_path.read_text()) if backbone_path.is_file() else None
    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found: the policy folder has config.json but no weights")

    with torch.device("meta"):
        policy = make_policy(config, backbone)
    state_dict = {k: v for k, v in load_file(str(weights_path)).items() if not k.startswith(_IGNORED_KEY_PREFIXES)}
    fix_keys = getattr(policy, "fix_state_dict_keys", None)  # key layouts of other LeRobot/openpi versions
    if fix_keys is not None:
        state_dict = fix_keys(state_dict)
    expected = policy.state_dict().keys()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match a {config.type} policy with this config.json: "
            f"missing {len(missing)} keys {missing[:5]}, unexpected {len(unexpected)} keys {unexpected[:5]}"
        )
    for name, tensor in policy.state_dict().items():
        if state_dict[name].shape != tensor.shape:
            raise ValueError(f"{weights_path}: {name} has shape {tuple(state_dict[name].shape)}, "
                             f"the config gives {tuple(tensor.shape)}")
    if dtype is not None:
        keep = getattr(policy, "keep_in_float32", ())  # what LeRobot keeps in float32 in a bf16 policy (pi0)
        state_dict = {k: v.to(torch.float32 if any(s in k for s in keep) else dtype) if v.is_floating_point() else v
                      for k, v in state_dict.items()}
    policy.load_state_dict(state_dict, assign=True)
    if hasattr(policy, "tie_weights"):  # assign=True gives tied parameters separate tensors: share them again
        policy.tie_weights()
    _materialize_buffers(policy)
    if dtype is not None and hasattr(policy, "apply_storage_dtype"):
        policy.apply_storage_dtype(dtype)
    return policy


def _materialize_buffers(module: nn.Module) -> None:
    """Non-persistent buffers (rotary tables) are not in the file: rebuild their modules on the CPU after a meta
    build. Such modules (transformers' rotary embeddings) are built from their config alone."""
    for sub in module.modules():
        meta_buffers = [name for name, buf in sub.named_buffers(recurse=False) if buf is not None and buf.is_meta]
        if not meta_buffers:
            continue
        if meta_buffers == ["embed_scale"] and hasattr(sub, "scalar_embed_scale"):  # Gemma's scaled embeddings
            sub.register_buffer("embed_scale", torch.tensor(sub.scalar_embed_scale), persistent=False)
            continue
        if not hasattr(sub, "config"):
            raise RuntimeError(f"buffers {meta_buffers} of {type(sub).__name__} were not loaded")
        with torch.device("cpu"):
            fresh = type(sub)(sub.config)
        fresh_buffers = dict(fresh.named_buffers(recurse=False))
        for name in meta_buffers:
            persistent = name not in sub._non_persistent_buffers_set
            sub.register_buffer(name, fresh_buffers[name], persistent=persistent)


__all__ = [
    "POLICIES",
    "PI05Config",
    "PI05Policy",
    "PI0Config",
    "PI0Policy",
    "PolicyConfig",
    "SmolVLAConfig",
    "SmolVLAPolicy",
    "config_from_dict",
    "load_policy",
    "load_policy_config",
    "make_policy",
    "policy_class",
    "save_policy",
]
