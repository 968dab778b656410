"""PEFT adapters on a policy: method by name, default or user targets, fully trained modules, counts.

Targets are resolved here to the explicit list of module names before PEFT sees them, so a pattern that matches
nothing fails with the candidate names, and the adapter config says exactly which modules were adapted.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from pathlib import Path

import torch
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

from finetune.config import PEFT_METHOD_FULL, ConfigError, PeftOptions, QuantOptions

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterMismatchError(ValueError):
    """A saved adapter (or checkpoint) does not fit the base it is put on; the message says why and what to pass."""

# Layer types PEFT's tuners adapt; the candidates we list and match against.
ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)


def adaptable_module_names(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if isinstance(module, ADAPTABLE_TYPES) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            names.append(name)
    return names


def _looks_like_regex(pattern: str) -> bool:
    return any(ch in pattern for ch in "()[]|*+?\\^$")


def resolve_target_modules(model: nn.Module, targets: str | tuple[str, ...] | list[str]) -> list[str]:
    """Full names of the adaptable modules selected by one regex (full match) or by name suffixes."""
    candidates = adaptable_module_names(model)
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if len(targets) == 1 and _looks_like_regex(targets[0]):
        try:
            regex = re.compile(targets[0])
        except re.error as err:
            raise ConfigError(f"--peft.target-modules {targets[0]!r} is not a valid regex: {err}") from err
        selected = [n for n in candidates if regex.fullmatch(n)]
        if not selected:
            raise ConfigError(_no_match_message(targets[0], candidates))
        return selected
    selected = []
    for suffix in targets:
        hits = [n for n in candidates if n == suffix or n.endswith("." + suffix)]
        if not hits:
            raise ConfigError(_no_match_message(suffix, candidates))
        selected += [n for n in hits if n not in selected]
    return selected


def _no_match_message(pattern: str, candidates: list[str]) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    key = pattern.rsplit(".", 1)[-1].strip("()$^\\")
    near = difflib.get_close_matches(key, suffixes, n=5, cutoff=0.3)
    examples = [n for n in candidates if any(n.endswith("." + s) or n == s for s in near)][:8]
    return (
        f"--peft.target-modules {pattern!r} matches no adaptable (linear) module. "
        f"Nearby names: {near or suffixes[:10]}; "
        f"e.g. {examples or candidates[:8]}. Give suffixes (q_proj v_proj) or one regex matched against full names."
    )


def resolve_full_training_modules(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    module_names = [n for n, _ in model.named_modules() if n]
    out = []
    for suffix in names:
        hits = [n for n in module_names if n == suffix or n.endswith("." + suffix)]
        if not hits:
            near = difflib.get_close_matches(suffix, sorted({n.rsplit(".", 1)[-1] for n in module_names}), n=5)
            raise ConfigError(f"--peft.full-training-modules {suffix!r} matches no module; nearby names: {near}")
        out += hits
    return out


def build_peft_config(opts: PeftOptions, targets: list[str], full_training: list[str]):
    """A PEFT config of the chosen method, passing each option the method has."""
    method = opts.method.upper()
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[method]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    alpha = opts.lora_alpha if opts.lora_alpha is not None else opts.r
    wanted = {
        "target_modules": targets,
        "modules_to_save": full_training or None,
        "r": opts.r,
        "lora_alpha": alpha,
        "alpha": alpha,  # LoHa / LoKr
        "lora_dropout": opts.lora_dropout,
        "feedforward_modules": [],  # IA3: scale outputs (not inputs) of every target
        "oft_block_size": 0,  # OFT: the block count is --peft.r (PEFT refuses both r and a block size)
    }
    if opts.init_type is not None:
        wanted["init_lora_weights" if "init_lora_weights" in fields else "init_weights"] = opts.init_type
    asked = {"use_dora": opts.use_dora, "use_rslora": opts.use_rslora, "rank_pattern": dict(opts.rank_pattern),
             "alpha_pattern": dict(opts.alpha_pattern)}
    for name, value in asked.items():
        if value and name not in fields:
            raise ConfigError(f"--peft.{name.replace('_', '-')} is an option of LORA, not of --peft.method {method}; "
                              "drop it or use --peft.method LORA")
    wanted.update({k: v for k, v in asked.items() if v})
    if "target_modules" not in fields:
        raise ConfigError(f"--peft.method {method} does not adapt linear layers (it tunes prompts or tokens); "
                          "choose e.g. LORA, LOHA, LOKR, IA3, VERA or OFT")
    return config_cls(**{k: v for k, v in wanted.items() if k in fields})


def apply_adapter(policy: nn.Module, opts: PeftOptions) -> nn.Module:
    """Wrap the policy with a fresh adapter and freeze the rest; for FULL, train what LeRobot's full fine-tune trains
    (the policy config's freeze_vision_encoder / train_expert_only decide)."""
    if opts.method.upper() == PEFT_METHOD_FULL:
        set_full_training_grads(policy)
        return policy
    targets_opt = opts.target_modules if opts.target_modules is not None else policy.default_lora_targets
    full_training = resolve_full_training_modules(policy, opts.full_training_modules)
    targets = [
        t for t in resolve_target_modules(policy, targets_opt)
        if not any(t == f or t.startswith(f + ".") for f in full_training)
    ]
    if not targets:
        raise ConfigError("every adapter target is also in --peft.full-training-modules; nothing left to adapt")
    return get_peft_model(policy, build_peft_config(opts, targets, full_training))


def set_full_training_grads(policy: nn.Module) -> list[str]:
    """Trainable flags of a FULL run (see FlowMatchingPolicy.set_full_training_grads); the frozen names."""
    if hasattr(policy, "set_full_training_grads"):
        return policy.set_full_training_grads()
    for p in policy.parameters():
        p.requires_grad_(True)
    return []


def load_adapter(policy: nn.Module, adapter_dir: str | Path, trainable: bool) -> PeftModel:
    """Attach a saved adapter (config and weights) to the base: the one adapter, never a fresh one on top."""
    return PeftModel.from_pretrained(policy, str(adapter_dir), is_trainable=trainable)


def check_adapter_fits(policy: nn.Module, checkpoint: Path) -> None:
    """Every adapted module exists in the base and has the shapes the adapter's tensors were trained for."""
    modules = dict(policy.named_modules())
    params = dict(policy.named_parameters())
    prefix = "base_model.model."
    problems = []
    with safe_open(str(Path(checkpoint) / ADAPTER_WEIGHTS), "pt") as f:
        for key in f.keys():
            name = key.removeprefix(prefix)
            shape = tuple(f.get_slice(key).get_shape())
            for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
                if part not in name:
                    continue
                module_name = name.split(part)[0]
                module = modules.get(module_name)
                if module is None:
                    problems.append(f"{module_name} (adapted) does not exist in the base")
                    break
                features = getattr(module, "in_features" if dim == 1 else "out_features", None)
                if features is not None and len(shape) == 2 and shape[dim] != features:
                    kind = "input" if dim == 1 else "output"
                    problems.append(f"{module_name}: the adapter expects {shape[dim]} {kind} features, the base has "
                                    f"{features}")
                break
            else:
                if name in params and tuple(params[name].shape) != shape:  # a fully trained module (modules_to_save)
                    problems.append(f"{name}: the checkpoint has shape {shape}, the base {tuple(params[name].shape)}")
    if problems:
        listed = "; ".join(dict.fromkeys(problems[:5]))
        raise AdapterMismatchError(f"the adapter in {checkpoint} does not fit the base policy ({len(problems)} "
                                   f"mismatches, e.g. {listed}); it was trained on a base with other shapes: pass "
                                   "that base")


def attach_adapter(policy: nn.Module, checkpoint: Path, trainable: bool = False) -> PeftModel:
    """The saved adapter on the base, after checking that it fits (a clear error instead of PEFT's)."""
    check_adapter_fits(policy, checkpoint)
    try:
        return load_adapter(policy, checkpoint, trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        raise AdapterMismatchError(f"the adapter in {checkpoint} does not load onto this base: {err}") from None


def quantize_base(policy: nn.Module, quant: QuantOptions, peft: PeftOptions, device: torch.device,
                  trainable: bool) -> nn.Module:
    """The frozen base as a run trains on it: its backbone linears in 8/4-bit when --quant.* asks (modules trained in
    full stay full precision); for training, the embeddings' outputs require grad (checkpointing, peft #137)."""
    if not quant.enabled:
        return policy
    from finetune.quant import enable_input_require_grads, quantize_policy

    keep = resolve_full_training_modules(policy, peft.full_training_modules)
    policy = quantize_policy(policy, quant, device, keep)
    if trainable:
        enable_input_require_grads(policy)
    return policy


def quantize_and_attach(policy: nn.Module, quant: QuantOptions, peft: PeftOptions, device: torch.device, *,
                        adapter_dir: str | Path | None = None, trainable: bool) -> nn.Module:
    """The one path from a full-precision base to the model a run trains, resumes or predicts with (train, merge and
    predict all come through here): quantize the base as the run did, then attach the saved adapter (`adapter_dir`),
    or, for a new run, a fresh one from `peft`."""
    dora = peft.use_dora if adapter_dir is None else \
        json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("use_dora", False)
    if dora and quant.enabled and device.type == "cpu":
        raise ConfigError("DoRA on a quantized base does not run on CPU here: PEFT computes DoRA's weight norm "
                          "through bitsandbytes' CPU dequantization, which is wrong for many 4-bit layer widths "
                          "(off by up to 4e-3; finetune/quant.py dequantizes LoRA's base weights itself) and fails "
                          "for 8-bit layers. Use LoRA without --peft.use-dora on the quantized base, DoRA on a "
                          "float32/bf16 base, or a CUDA GPU")
    policy = quantize_base(policy, quant, peft, device, trainable)
    if adapter_dir is not None:
        return attach_adapter(policy, Path(adapter_dir), trainable)
    if not trainable:
        raise ValueError("quantize_and_attach: a fresh adapter is only for training; pass adapter_dir")
    return apply_adapter(policy, peft)


def parameter_count(param: nn.Parameter) -> int:
    """Elements of the full-precision parameter a tensor stands for: a packed 4-bit weight (bitsandbytes Params4bit)
    stores two values per uint8 (more per wider storage dtype), so its own numel() undercounts; its quant_state keeps
    the original shape. 8-bit weights keep one int8 per value."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)
    return param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, quantized weights counted as the values they hold."""
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(parameter_count(p) for p in model.parameters())


def base_policy(model: nn.Module) -> nn.Module:
    """The policy under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
