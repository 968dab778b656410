"""Loading what a run trained: an adapter checkpoint on its base (quantized as in training) or a full policy folder.

Shared by finetune.inference.predict and finetune.export.merge (predict does not import merge); imports no training
loop or publishing code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from finetune.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterMismatchError, quantize_and_attach
from finetune.config import PeftOptions, QuantOptions, TrainConfig, read_train_config
from finetune.hub import resolve_repo
from finetune.policies import load_policy, load_policy_config
from finetune.policies.base import PolicyConfig
from finetune.policies.cpu_linear import use_cpu_linear
from finetune.training.ema import weights_folder


def checkpoint_kind(checkpoint: Path) -> str:
    """`adapter` (PEFT files) or `full` (a whole policy: a FULL run's checkpoint or a merged folder)."""
    if (checkpoint / ADAPTER_CONFIG).is_file():
        if not (checkpoint / ADAPTER_WEIGHTS).is_file():
            raise AdapterMismatchError(f"{checkpoint} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: the checkpoint is "
                             "incomplete")
        return "adapter"
    if (checkpoint / "model.safetensors").is_file():
        return "full"
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    raise FileNotFoundError(f"{checkpoint} holds neither an adapter ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}) nor a "
                            "policy (config.json, model.safetensors)")


def resolve_base(checkpoint: Path, base: str | None) -> Path:
    """The base folder: `base` when given, else the --policy.path in the checkpoint's train_config.json, else (a
    LeRobot PEFT run) the base_model_name_or_path in its adapter_config.json."""
    if base is not None:
        return resolve_repo(base, "model", "base policy")
    train_cfg = read_train_config(checkpoint)
    recorded = train_cfg.policy.path if train_cfg is not None else None
    source = "train_config.json: policy.path"
    if recorded is None and (checkpoint / ADAPTER_CONFIG).is_file():  # e.g. a LeRobot PEFT run's pretrained_model/
        recorded = json.loads((checkpoint / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        source = f"{ADAPTER_CONFIG}: base_model_name_or_path"
    if recorded is None:
        raise AdapterMismatchError(f"{checkpoint} names no base (no train_config.json policy.path, no "
                                   f"{ADAPTER_CONFIG} base_model_name_or_path); pass the base policy (--base)")
    try:
        return resolve_repo(recorded, "model", "base policy")
    except FileNotFoundError as err:  # e.g. a relative path from another working directory
        raise FileNotFoundError(f"the base the checkpoint was trained from ({source}) cannot be found: {err} Pass the "
                                "base policy (--base / base=).") from None


def config_overrides(trained: PolicyConfig, base: PolicyConfig) -> dict:
    """Config fields the run changed from the base's (dataset features, chunk size, denoising steps, ...)."""
    return {f.name: getattr(trained, f.name) for f in dataclasses.fields(trained)
            if f.name != "extra" and getattr(trained, f.name) != getattr(base, f.name, None)}


def load_base_for_checkpoint(checkpoint: Path, base_dir: Path, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """The base policy, built with the config the checkpoint was trained with, in full precision (by default).

    Refuses a base of another policy type, and one whose weights do not fit that config.
    """
    trained = load_policy_config(checkpoint)
    base = load_policy_config(base_dir)
    if base.type != trained.type:
        raise AdapterMismatchError(f"the checkpoint {checkpoint} was trained on a {trained.type!r} policy but the base "
                         f"{base_dir} is a {base.type!r} policy; pass the base it was trained from")
    overrides = config_overrides(trained, base)
    try:
        return load_policy(base_dir, dtype=dtype, **overrides)
    except ValueError as err:
        raise AdapterMismatchError(f"the base {base_dir} does not fit the checkpoint's policy config "
                         f"(fields changed by the run: {sorted(overrides) or 'none'}): {err}") from None


def quant_label(train_cfg: TrainConfig | None) -> str | None:
    if train_cfg is None or not train_cfg.quant.enabled:
        return None
    q = train_cfg.quant
    return "8-bit" if q.load_in_8bit else f"4-bit {q.quant_type}"


def load_trained_policy(checkpoint: Path, base: str | None, device: torch.device, dtype: torch.dtype,
                        use_trained_weights: bool = True, use_ema: bool | None = None) -> tuple[nn.Module, Path]:
    """The policy a checkpoint describes, ready to predict, and the folder its tokenizer comes from.

    An adapter goes onto its base (`base`, or the one in train_config.json) through the same quantize-and-attach path
    as training: on a quantized base as trained, else merged into the full-precision base (same function, no adapter
    overhead). A full policy folder loads as it is. `use_trained_weights=False` gives the run's starting point (the
    base with the checkpoint's config). `use_ema`: the checkpoint's EMA weights (ema/) when it has them (None),
    always (True), never (False).
    """
    if not use_trained_weights or checkpoint_kind(checkpoint) == "adapter":
        base_dir = resolve_base(checkpoint, base)
        policy = load_base_for_checkpoint(checkpoint, base_dir, dtype)
        if not use_trained_weights:
            use_cpu_linear(policy, "auto")
            return policy, base_dir
        train_cfg = read_train_config(checkpoint)
        quant = train_cfg.quant if train_cfg is not None else QuantOptions()
        peft = train_cfg.peft if train_cfg is not None else PeftOptions()
        model = quantize_and_attach(policy, quant, peft, device, adapter_dir=weights_folder(checkpoint, use_ema),
                                    trainable=False)
        model = model if quant.enabled else model.merge_and_unload()
        use_cpu_linear(model, "auto")  # float32 CPU: the faster kernel per shape here; other cases are untouched
        return model, base_dir
    model = load_policy(weights_folder(checkpoint, use_ema), dtype=dtype)
    use_cpu_linear(model, "auto")
    return model, checkpoint
