"""Checks made before anything is built: a readable policy folder, a chunk size that fits, the stats the policy
needs, undamaged checkpoint files. Each refusal is a ConfigError that names the file or flag and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.config import ConfigError, TrainConfig
from finetune.data.stats import check_stats, needed_stats
from finetune.policies import POLICIES, load_policy_config
from finetune.policies.base import ACTION
from finetune.policies.relative_actions import uses_relative_actions
from finetune.training import checkpoint as ckpt


def check_policy_folder(cfg: TrainConfig, policy_dir: Path, batch_size: int) -> None:
    """A readable config.json of a known policy type, complete weights, and a chunk size that fits in memory."""
    config_path, weights = policy_dir / "config.json", policy_dir / "model.safetensors"
    try:
        data = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{config_path} not found: --policy.path must be a LeRobot-format policy folder "
                          "(config.json + model.safetensors)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_path} is not valid JSON ({err}); copy the policy folder again") from None
    if data.get("type") not in POLICIES:
        raise ConfigError(f"{config_path}: field 'type' is {data.get('type')!r}, not a policy this suite trains "
                          f"({', '.join(sorted(POLICIES))}); point --policy.path at a SmolVLA, pi0 or pi0.5 folder")
    check_safetensors(weights, "copy or download the policy folder again")
    chunk = cfg.policy.chunk_size or int(data.get("chunk_size", 50))
    check_chunk_size_fits(chunk, int(data.get("tokenizer_max_length", 48)), batch_size)


def check_safetensors(path: Path, fix: str) -> None:
    """Refuse a missing or truncated .safetensors file (its header declares more bytes than the file holds)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ConfigError(f"{path} not found; {fix}")
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path} is truncated or corrupt ({err}); {fix}") from None


def check_chunk_size_fits(chunk: int, text_tokens: int, batch_size: int) -> None:
    """Refuse an action chunk whose attention scores alone cannot fit, before anything is allocated. A lower bound:
    one micro-batch x one head x (chunk + instruction tokens)^2 float32 scores."""
    import psutil

    tokens = chunk + text_tokens
    need = batch_size * tokens * tokens * 4
    if torch.cuda.is_available():
        have, where = torch.cuda.mem_get_info()[1], "GPU memory"
    else:
        have, where = psutil.virtual_memory().total, "RAM"
    if need > have:
        raise ConfigError(f"--policy.chunk-size {chunk} needs at least {need / 2**30:.1f} GiB for one micro-batch's "
                          f"attention scores ({batch_size} x {tokens}^2 tokens x 4 bytes), more than the "
                          f"{have / 2**30:.1f} GiB of {where}; use the policy's chunk size (50 for SmolVLA/pi0) or "
                          "a smaller --batch-size")


def check_dataset_stats(cfg: TrainConfig, policy_dir: Path, sources) -> None:
    """Every dataset has the stats the policy's normalization needs (relative actions get theirs computed later);
    stops before any model is built and names the command that adds them."""
    policy_config = load_policy_config(policy_dir)
    needed = needed_stats(policy_config.normalization_mapping)
    if cfg.policy.use_relative_actions or uses_relative_actions(policy_config):
        needed.pop(ACTION)
    for source in sources:
        check_stats({cfg.dataset.rename_map.get(k, k): v for k, v in source.view.stats.items()}, needed, source.root)


def earlier_checkpoint_fix(checkpoint: Path) -> str:
    """How to go back to the checkpoint before a damaged one (or that none is left)."""
    earlier = [p.name for p in ckpt.list_checkpoints(checkpoint.parent) if p.name < checkpoint.name]
    if earlier:
        return (f"resume from the previous one: `ln -sfn {earlier[-1]} {checkpoint.parent / ckpt.LAST}` then --resume "
                f"(or start a new --output-dir)")
    return "no earlier checkpoint is left: start a new --output-dir (or --overwrite)"


def check_checkpoint_files(checkpoint: Path, json_files: list[str], tensor_files: list[str]) -> None:
    """Refuse a damaged checkpoint (truncated or unreadable files) with the way back to an earlier one."""
    fix = f"the checkpoint is damaged; {earlier_checkpoint_fix(checkpoint)}"
    for name in json_files:
        try:
            json.loads((checkpoint / name).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{checkpoint / name} cannot be read ({type(err).__name__}); {fix}") from None
    for name in tensor_files:
        check_safetensors(checkpoint / name, fix)
