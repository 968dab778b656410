"""Builds the model a run trains: the base policy with the dataset's features, then an adapter on it (quantized base
when asked), the resumed adapter, or the whole policy for FULL training; and the EMA of its trained weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from finetune.adapters import base_policy, quantize_and_attach, set_full_training_grads
from finetune.config import ConfigError, TrainConfig
from finetune.data import DatasetError
from finetune.hub import resolve_repo
from finetune.policies import load_policy
from finetune.policies.base import ACTION, OBS_STATE
from finetune.policies.common import DTYPES
from finetune.policies.cpu_linear import use_cpu_linear
from finetune.policies.relative_actions import action_names
from finetune.policies.relative_actions import configure as configure_relative_actions
from finetune.training import distributed as dist
from finetune.training.ema import EMA
from finetune.training.preflight import check_checkpoint_files

log = logging.getLogger(__name__)


def policy_features(meta, rename_map: dict[str, str]) -> tuple[dict, dict]:
    """The policy's input/output features from the dataset's (cameras, state, action), after renaming."""
    inputs = {}
    for key in meta.camera_keys:
        h, w, c = meta.features[key]["shape"]
        inputs[rename_map.get(key, key)] = {"type": "VISUAL", "shape": [c, h, w]}
    if OBS_STATE not in meta.features:
        raise DatasetError(f"{meta.root / 'meta/info.json'}: features has no {OBS_STATE!r}; the policy needs a state")
    inputs[rename_map.get(OBS_STATE, OBS_STATE)] = {"type": "STATE", "shape": list(meta.features[OBS_STATE]["shape"])}
    if ACTION not in meta.features:
        raise DatasetError(f"{meta.root / 'meta/info.json'}: features has no 'action'")
    return inputs, {ACTION: {"type": "ACTION", "shape": list(meta.features[ACTION]["shape"])}}


def attention_kernels(cfg: TrainConfig, accelerator: Accelerator) -> tuple[str, str]:
    """(joint layers, vision tower) kernels for --policy.attn-implementation. auto is SDPA, except in the joint layers
    of a CPU run under bf16/fp16 autocast: there SDPA's flash-attention backward is slower than eager's matmul and
    softmax backward (real-size SmolVLA LoRA step, batch 8, bf16, 2-core Intel Xeon: 4.82 s against 4.30 s,
    bench/step.py --attn main sdpa). The vision tower keeps SDPA: eager made that step 3x slower."""
    name = cfg.policy.attn_implementation
    if name != "auto":
        return name, name
    half_on_cpu = accelerator.device.type == "cpu" and accelerator.mixed_precision in ("bf16", "fp16")
    return ("eager" if half_on_cpu else "sdpa"), "sdpa"


def load_base_policy(cfg: TrainConfig, policy_dir: Path, meta, attention: tuple[str, str]) -> nn.Module:
    """The pretrained policy, its features taken from the dataset (as LeRobot does), with the run's overrides."""
    overrides = {k: v for k, v in (("chunk_size", cfg.policy.chunk_size), ("num_steps", cfg.policy.num_steps))
                 if v is not None}
    try:
        policy = load_policy(policy_dir, dtype=DTYPES[cfg.policy.dtype], **overrides)
    except ValueError as err:  # weights that do not match config.json: the loader names file and keys
        raise ConfigError(f"{err}; copy the policy folder again or fix its config.json") from None
    inputs, outputs = policy_features(meta, cfg.dataset.rename_map)
    pcfg = policy.config
    if inputs[OBS_STATE]["shape"][0] > getattr(pcfg, "max_state_dim", 1 << 30):
        raise ConfigError(f"the dataset's state has {inputs[OBS_STATE]['shape'][0]} dims, more than the policy's "
                          f"max_state_dim {pcfg.max_state_dim}")
    if outputs[ACTION]["shape"][0] > getattr(pcfg, "max_action_dim", 1 << 30):
        raise ConfigError(f"the dataset's action has {outputs[ACTION]['shape'][0]} dims, more than the policy's "
                          f"max_action_dim {pcfg.max_action_dim}")
    pcfg.input_features, pcfg.output_features = inputs, outputs
    use_relative = cfg.policy.use_relative_actions or None  # off: the checkpoint's own setting
    error = configure_relative_actions(pcfg, use_relative, cfg.policy.relative_exclude_joints,
                                       action_names(meta.features[ACTION]))
    if error:
        raise ConfigError(error)
    policy.set_gradient_checkpointing(cfg.policy.gradient_checkpointing)
    policy.set_attn_implementation(*attention)
    return policy


def initial_adapter(cfg: TrainConfig) -> Path | None:
    """--peft.init-from as a local folder (a Hub id is fetched), or None for a fresh adapter."""
    if cfg.peft.init_from is None:
        return None
    try:
        folder = resolve_repo(cfg.peft.init_from, "model", "--peft.init-from")
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"--peft.init-from {cfg.peft.init_from}: {folder} holds no adapter (adapter_config.json, "
                          "adapter_model.safetensors); pass one of our adapter checkpoints or a LeRobot PEFT run's "
                          "checkpoints/<step>/pretrained_model")
    return folder


def build_model(cfg: TrainConfig, policy: nn.Module, accelerator: Accelerator, resume_from: Path | None) -> nn.Module:
    """The trainable model: an adapter on `policy` (the saved adapter itself when resuming, never a fresh one on
    top; --peft.init-from's adapter for a new run starting from one), or for a resumed FULL run the checkpoint's
    whole policy. Trained parameters are float32 whatever the base's storage dtype."""
    if resume_from is not None and not (resume_from / "adapter_config.json").is_file():
        check_checkpoint_files(resume_from, ["config.json"], ["model.safetensors"])
        model = load_policy(resume_from)
        model.config.input_features = policy.config.input_features
        model.config.output_features = policy.config.output_features
        model.set_attn_implementation(*attention_kernels(cfg, accelerator))
        set_full_training_grads(model)
    else:
        adapter_dir = resume_from if resume_from is not None else initial_adapter(cfg)
        if adapter_dir is not None:
            check_checkpoint_files(adapter_dir, ["adapter_config.json"], ["adapter_model.safetensors"])
        model = quantize_and_attach(policy, cfg.quant, cfg.peft, accelerator.device, adapter_dir=adapter_dir,
                                    trainable=True)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    # ZeRO-3 gathers and frees weights around each module and handles torch's linear only
    kind = "aten" if dist.zero_stage(accelerator) == 3 else cfg.policy.cpu_linear
    counts = use_cpu_linear(model, kind)
    if accelerator.device.type == "cpu" and sum(counts.values()):
        log.info(f"cpu linears ({kind}): {counts['onednn']} on oneDNN, {counts['aten']} on torch's (MKL)")
    if cfg.policy.compile:
        base_policy(model).compile_forward()
        log.info("torch.compile: the first step compiles (minutes on a few CPU cores), as does each new batch shape")
    return model


def make_ema(cfg: TrainConfig, accelerator: Accelerator, model: nn.Module) -> EMA | None:
    """--ema.decay: a moving average of the trained weights (needs whole parameters on each rank)."""
    if cfg.ema.decay == 0:
        return None
    if dist.zero_stage(accelerator) == 3 or accelerator.distributed_type.value == "FSDP":
        raise ConfigError("--ema.decay needs whole parameters on each rank: it does not run under ZeRO-3/FSDP "
                          "sharding; use ZeRO-1/2 or DDP, or drop --ema.decay")
    return EMA(accelerator.unwrap_model(model), cfg.ema.decay)
