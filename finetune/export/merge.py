"""Merge an adapter checkpoint into its base and export a full policy folder in LeRobot's format.

    finetune-merge --checkpoint runs/my_task/checkpoints/last --output-dir runs/my_task/merged [--base FOLDER_OR_ID]

The output folder is a LeRobot policy: `config.json` (the config the adapter was trained with: type, dataset
features, chunk size), `model.safetensors` (every weight, with exactly the base file's keys and, by default, its
dtypes; pi0/pi0.5 also get the expert LM head LeRobot's module has, zeros when the base lacks it), the normalization
stats both as finetune's `normalization_stats.safetensors` and as LeRobot 0.6's
`policy_preprocessor.json` / `policy_postprocessor.json` + normalizer state files, the tokenizer, the run's
`train_config.json` and a README.md model card (base, adapter config, dataset, metrics).

LeRobot loads it with its own entry points from any working directory: the processor's tokenizer is named as LeRobot
names it (SmolVLA: the VLM's Hub id; pi0/pi0.5: the PaliGemma tokenizer); a custom backbone travels in `vlm/`, named by
absolute path (finetune.export.lerobot_vlm). The checkpoint may also be a LeRobot PEFT run's `pretrained_model/`
folder: its base comes from adapter_config.json, its stats from LeRobot's processor files.

Merging always starts from a full-precision load of the base. When the adapter was trained on an 8/4-bit base
(train_config.json: quant), the base is first quantized as in training and dequantized again, so the merged weights
reproduce the function that was trained; `--quant-base original` merges into the original weights instead.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from safetensors import safe_open
from torch import nn

from finetune import _quiet  # noqa: F401 - first: silences notices raised while peft imports bitsandbytes
from finetune.adapters import (  # noqa: F401  (check_adapter_fits re-exported: merge's name before adapters had it)
    ADAPTER_CONFIG,
    AdapterMismatchError,
    attach_adapter,
    check_adapter_fits,
    quantize_base,
)
from finetune.config import ConfigError, TrainConfig, read_train_config
from finetune.entry import console_script, exit_on
from finetune.export.lerobot_vlm import VLM_DIR, point_at_vlm, write_vlm_folder
from finetune.export.model_card import model_card, push_folder
from finetune.hub import check_can_push, load_tokenizer
from finetune.inference.loading import (  # noqa: F401  (re-exported: merge's public names before loading.py existed)
    checkpoint_kind,
    config_overrides,
    load_base_for_checkpoint,
    quant_label,
    resolve_base,
)
from finetune.policies import backbone_config_dict, config_from_dict, save_policy
from finetune.policies.base import PolicyConfig
from finetune.policies.common import DTYPES
from finetune.policies.lerobot_processor import (
    lerobot_tokenizer_name,
    read_processor_stats,
    read_rename_map,
    write_processor_files,
)
from finetune.policies.processor import STATS_FILE, load_stats, save_stats
from finetune.training.ema import weights_folder
from finetune.training.metrics import run_dir_of, run_metrics
from finetune.training.run_lock import reading_checkpoint

MERGE_INFO = "merge_info.json"
# The checkpoint cannot be merged into this base; the message says why and what to pass instead.
MergeError = AdapterMismatchError


@dataclass(frozen=True)
class MergeConfig:
    checkpoint: str
    """Adapter checkpoint folder (output_dir/checkpoints/<step> or .../last)."""
    output_dir: str
    """Where the merged LeRobot-format policy is written (replaced when it exists)."""
    base: str | None = None
    """Base policy folder or Hub id; default: the --policy.path the checkpoint was trained from."""
    tokenizer_path: str | None = None
    """Tokenizer folder, when the base folder has none."""
    dtype: Literal["base", "float32", "bfloat16", "float16"] = "base"
    """Dtype of the merged weights: `base` keeps each tensor's dtype in the base file."""
    quant_base: Literal["dequantized", "original"] = "dequantized"
    """For an adapter trained on an 8/4-bit base: merge into that base dequantized (what was trained) or into the
    original full-precision weights."""
    push_to: str | None = None
    """Also upload the merged folder to this Hub model repo (needs network and a login)."""
    use_ema: bool | None = None
    """Merge the checkpoint's EMA weights (ema/): default when it has them; False for the last trained weights."""


# --- loading --------------------------------------------------------------------------------------------------------

def dequantize_as_trained(policy: nn.Module, train_cfg: TrainConfig) -> nn.Module:
    """Quantize the full-precision base as the run did (training's quantize step), then dequantize it: the weights the
    adapter was trained on."""
    from finetune.quant import dequantize_policy

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = quantize_base(policy, train_cfg.quant, train_cfg.peft, device, trainable=False)
    return dequantize_policy(policy, torch.float32).to("cpu")


def load_merged_policy(checkpoint: Path, base_dir: Path, quant_base: str = "dequantized", use_ema: bool | None = None
                       ) -> tuple[nn.Module, list[str]]:
    """Base (full precision) + adapter, merged: a plain policy module. Returns it and what was done, for the card."""
    train_cfg = read_train_config(checkpoint)
    policy = load_base_for_checkpoint(checkpoint, base_dir, torch.float32)
    notes = []
    label = quant_label(train_cfg)
    if label is not None:
        if quant_base == "dequantized":
            message = (f"the adapter was trained on a {label} base: quantizing the full-precision base as in training "
                       "and dequantizing it before merging (the merged weights reproduce what was trained; use "
                       "--quant-base original to merge into the original weights)")
            policy = dequantize_as_trained(policy, train_cfg)
        else:
            message = (f"the adapter was trained on a {label} base: merging into the original full-precision weights "
                       "(not the quantized ones it was trained on), as --quant-base original asks")
        print(f"merge: {message}", file=sys.stderr)
        notes.append(message)
    model = attach_adapter(policy, weights_folder(checkpoint, use_ema), trainable=False)
    try:
        merged = model.merge_and_unload()
    except (NotImplementedError, ValueError, TypeError) as err:
        raise MergeError(f"PEFT cannot merge this adapter type into the base weights: {err}") from None
    return merged.eval(), notes


# --- writing ----------------------------------------------------------------------------------------------------------

def base_file_layout(base_dir: Path) -> dict[str, torch.dtype]:
    """Keys and dtypes of the base's model.safetensors (read from the header, without loading the weights)."""
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        return {key: f.get_slice(key).get_dtype() for key in f.keys()}


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}


def state_dict_in_base_layout(policy: nn.Module, base_dir: Path, dtype: str = "base") -> dict[str, torch.Tensor]:
    """The policy's weights under the base file's key names, with exactly its key set.

    A base in another LeRobot/openpi key layout is mapped back through the policy's own key fix-up; base keys the
    policy does not use (e.g. old normalization buffers) are copied through unchanged.
    """
    layout = base_file_layout(base_dir)
    fix_keys = getattr(policy, "fix_state_dict_keys", None)
    # Apply the loader's key fix-up to the key names themselves: model key -> the base file's key.
    to_base = fix_keys({k: k for k in layout}) if fix_keys is not None else {k: k for k in layout}
    state = policy.state_dict()
    out: dict[str, torch.Tensor] = {}
    for model_key, base_key in to_base.items():
        if model_key in state:
            out[base_key] = state[model_key]
    missing = [k for k in layout if k not in out]
    if missing:
        with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
            for key in missing:
                out[key] = f.get_tensor(key)
    for key, tensor in out.items():
        if not tensor.is_floating_point():
            continue
        target = DTYPES[dtype] if dtype != "base" else _SAFETENSORS_DTYPES.get(str(layout[key]), tensor.dtype)
        out[key] = tensor.to(target)
    if set(out) != set(layout):
        raise MergeError(f"internal: merged keys differ from the base's ({sorted(set(out) ^ set(layout))[:5]})")
    return out


def add_lerobot_only_tensors(policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Tensors LeRobot's module of this policy type has and ours does not use (pi0's expert LM head), when the base
    file lacked them: LeRobot loads pi0/pi0.5 strictly and keeps random weights when a key is missing."""
    extra = getattr(policy, "lerobot_only_tensors", None)
    if extra is None:
        return
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    for key, tensor in extra(dtype).items():
        state.setdefault(key, tensor)


def copy_tokenizer(base_dir: Path, out: Path, tokenizer_path: str | None, config: PolicyConfig):
    """Save the tokenizer at the top of `out` (where finetune looks); returns it, or None when none was found."""
    try:
        tokenizer = load_tokenizer(base_dir, tokenizer_path, config.tokenizer_name)
    except FileNotFoundError as err:
        print(f"merge: no tokenizer copied into the merged folder ({err})", file=sys.stderr)
        return None
    tokenizer.save_pretrained(str(out))
    return tokenizer


def checkpoint_stats(checkpoint: Path) -> dict:
    """The run's normalization stats: finetune's file, else a LeRobot checkpoint's processor files."""
    if (checkpoint / STATS_FILE).is_file():
        return load_stats(checkpoint)
    stats = read_processor_stats(checkpoint)
    if stats is None:
        raise MergeError(f"{checkpoint} has no {STATS_FILE} and no LeRobot processor files with normalization stats: "
                         "without them the merged policy cannot map actions to robot units; copy the file from the "
                         "run's checkpoint")
    return stats


def write_lerobot_names(out: Path, policy: nn.Module, tokenizer, base_dir: Path) -> str | None:
    """config.json (without LeRobot's use_peft flag) and the tokenizer name LeRobot's processor should load: a custom
    backbone goes into out/vlm and is named by absolute path; a Hub backbone by its Hub id, as LeRobot names it."""
    path = out / "config.json"
    config = config_from_dict(json.loads(path.read_text())).to_dict()  # as LeRobot 0.6 reads it (see to_dict)
    config.pop("use_peft", None)  # a merged folder is a whole policy, not an adapter
    path.write_text(json.dumps(config, indent=2) + "\n")
    if backbone_config_dict(policy) is None or tokenizer is None:
        return lerobot_tokenizer_name(policy.config, base_dir)
    name = str(write_vlm_folder(out, policy, tokenizer).resolve())
    if config["type"] == "smolvla":  # LeRobot builds the backbone from it (renamed again once the folder is in place)
        config["vlm_model_name"] = name
        path.write_text(json.dumps(config, indent=2) + "\n")
    return name


def merge_checkpoint(checkpoint: str | Path, output_dir: str | Path, *, base: str | None = None,
                     tokenizer_path: str | None = None, dtype: str = "base",
                     quant_base: str = "dequantized", use_ema: bool | None = None) -> Path:
    """Write base + adapter as one LeRobot-format policy folder; returns the folder. A checkpoint of a run still
    training is read as one step folder, kept until merged."""
    with reading_checkpoint(checkpoint) as folder:
        return _merge(folder, Path(output_dir), base, tokenizer_path, dtype, quant_base, use_ema)


def _merge(checkpoint: Path, output_dir: Path, base: str | None, tokenizer_path: str | None, dtype: str,
           quant_base: str, use_ema: bool | None) -> Path:
    if checkpoint_kind(checkpoint) != "adapter":
        raise MergeError(f"{checkpoint} holds a whole policy (model.safetensors), not an adapter: there is nothing to "
                         "merge; load it directly (finetune.policies.load_policy)")
    stats = checkpoint_stats(checkpoint)
    base_dir = resolve_base(checkpoint, base)
    merged, notes = load_merged_policy(checkpoint, base_dir, quant_base, use_ema)
    state = state_dict_in_base_layout(merged, base_dir, dtype)
    add_lerobot_only_tensors(merged, state)

    out = Path(output_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(merged, tmp, state_dict=state)  # config.json (+ vlm_config.json for custom backbones), weights
    shutil.copy2(checkpoint / "config.json", tmp / "config.json")  # the config the adapter was trained with
    save_stats(stats, tmp)
    train_cfg = read_train_config(checkpoint)
    if (checkpoint / "train_config.json").is_file():  # ours, or a LeRobot run's (kept as it is)
        shutil.copy2(checkpoint / "train_config.json", tmp / "train_config.json")
    tokenizer = copy_tokenizer(base_dir, tmp, tokenizer_path, merged.config)
    tokenizer_name = write_lerobot_names(tmp, merged, tokenizer, base_dir)
    rename_map = train_cfg.dataset.rename_map if train_cfg is not None else read_rename_map(checkpoint)
    write_processor_files(tmp, merged.config, stats, rename_map=rename_map, tokenizer_name=tokenizer_name)
    adapter_config = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
    base_name = base or (train_cfg.policy.path if train_cfg else None) or str(base_dir)
    card = model_card(kind="merged", policy_config=json.loads((checkpoint / "config.json").read_text()),
                      train_cfg=train_cfg, adapter_config=adapter_config, metrics=run_metrics(run_dir_of(checkpoint)),
                      base=base_name, notes=notes)
    (tmp / "README.md").write_text(card)
    info = {"base": base_name, "base_folder": str(base_dir), "checkpoint": str(checkpoint),
            "quantized_base": quant_label(train_cfg), "quant_base": quant_base if quant_label(train_cfg) else None,
            "dtype": dtype, "notes": notes, "ema_weights": weights_folder(checkpoint, use_ema) != checkpoint}
    (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if (out / VLM_DIR).is_dir():  # named by absolute path: the folder's final place, not tmp
        point_at_vlm(out, str((out / VLM_DIR).resolve()))
    return out


def push_merged(out: Path, repo_id: str) -> str:
    """Upload the merged folder; a custom backbone (vlm/) goes to its own repo `<repo_id>-vlm` first and the uploaded
    files name that repo (LeRobot resolves the backbone only as a Hub id or a path). The local folder keeps its
    absolute names."""
    if not (out / VLM_DIR).is_dir():
        return push_folder(out, repo_id, commit_message="Upload merged policy")
    vlm_repo = f"{repo_id}-vlm"
    push_folder(out / VLM_DIR, vlm_repo, commit_message="Upload the policy's backbone config and tokenizer")
    point_at_vlm(out, vlm_repo)
    try:
        return push_folder(out, repo_id, commit_message="Upload merged policy")
    finally:
        point_at_vlm(out, str((out / VLM_DIR).resolve()))


def main(argv: list[str] | None = None) -> Path:
    cfg = tyro.cli(MergeConfig, args=argv, description="Merge an adapter checkpoint into its base and export a "
                   "LeRobot-format policy folder.")
    with exit_on(MergeError, ConfigError, FileNotFoundError):
        check_can_push([cfg.push_to] if cfg.push_to else [], "--push-to")  # before the work, not after it
        out = merge_checkpoint(cfg.checkpoint, cfg.output_dir, base=cfg.base, tokenizer_path=cfg.tokenizer_path,
                               dtype=cfg.dtype, quant_base=cfg.quant_base, use_ema=cfg.use_ema)
    print(f"merged policy written to {out} ({len(base_file_layout(out))} tensors)")
    if cfg.push_to:
        print(f"pushed to {push_merged(out, cfg.push_to)}")
    return out


cli = console_script(main)


if __name__ == "__main__":
    main()
