"""What LeRobot needs to build an export whose backbone is not a Hub model, and the names that point it there.

LeRobot 0.6.1 builds SmolVLA's backbone with `AutoConfig.from_pretrained(vlm_model_name)` and
`AutoProcessor.from_pretrained(vlm_model_name)` (it reads the tokenizer's image-token ids from the processor), and its
tokenizer step calls `AutoTokenizer.from_pretrained(tokenizer_name)`. Both take a Hub id or a path, and a relative
path resolves against the working directory, never against the policy folder: LeRobot has no hook that resolves a
name relative to the pretrained path (its processor `overrides` and `--policy.vlm_model_name` are set by the caller).

So an export of a custom backbone (a tiny or local VLM: one with vlm_config.json) carries it in `vlm/`:

    vlm/config.json, preprocessor_config.json, processor_config.json   SmolVLA: the SmolVLM config and processor
    vlm/tokenizer.json, tokenizer_config.json                          the tokenizer (SmolVLA: with its image tokens)

and names it by absolute path (config.json's `vlm_model_name` for SmolVLA, the preprocessor's `tokenizer_name`): it
loads from any working directory, offline. After the folder moves, point the names at its new place:

    python -m finetune.export.lerobot_vlm FOLDER              # names FOLDER/vlm by its absolute path
    python -m finetune.export.lerobot_vlm FOLDER --name ID    # e.g. a Hub repo holding vlm/ (what --push-to does)

A backbone that is a Hub model (SmolVLM2-500M, PaliGemma) is named by its Hub id, exactly as LeRobot writes it;
offline, LeRobot then needs that model in the Hugging Face cache, as it always does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro
from torch import nn

from finetune.policies.lerobot_processor import set_tokenizer_name

VLM_DIR = "vlm"
# The tokenizer attributes SmolVLM's processor reads (LeRobot's SmolVLA takes fake_image_token_id and
# global_image_token_id from them); the names and strings of SmolVLM2's own tokenizer.
SMOLVLM_IMAGE_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "end_of_utterance_token": "<end_of_utterance>",
    "global_image_token": "<global-img>",
}


def smolvlm_processor_files(vlm_config: Any) -> dict[str, dict[str, Any]]:
    """preprocessor_config.json and processor_config.json for a SmolVLM config (image size from its vision tower).

    LeRobot's SmolVLA resizes and normalizes images itself; it only needs AutoProcessor to build."""
    vision = vlm_config.vision_config
    size = {"longest_edge": vision.image_size}
    image_seq_len = (vision.image_size // vision.patch_size) ** 2 // vlm_config.scale_factor**2
    image_processor = {
        "image_processor_type": "SmolVLMImageProcessor", "do_convert_rgb": True, "do_resize": True, "size": size,
        "max_image_size": size, "do_image_splitting": False, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
        "resample": 1,
    }
    return {"preprocessor_config.json": image_processor,
            "processor_config.json": {"processor_class": "SmolVLMProcessor", "image_seq_len": image_seq_len}}


def write_vlm_folder(out: Path, policy: nn.Module, tokenizer: Any) -> Path:
    """`out/vlm`: what LeRobot builds the policy's backbone and tokenizer from (SmolVLA: config, processor,
    tokenizer; pi0/pi0.5: the tokenizer, since LeRobot builds PaliGemma from its own variant table)."""
    vlm = out / VLM_DIR
    vlm.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(vlm))
    if policy.config.type != "smolvla":
        return vlm
    policy.vlm_config.save_pretrained(str(vlm))
    for name, content in smolvlm_processor_files(policy.vlm_config).items():
        (vlm / name).write_text(json.dumps(content, indent=2) + "\n")
    path = vlm / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    extra = tokenizer_config.get("extra_special_tokens")
    extra = extra if isinstance(extra, dict) else {}
    if not all(k in extra for k in SMOLVLM_IMAGE_TOKENS):
        tokenizer_config["extra_special_tokens"] = {**SMOLVLM_IMAGE_TOKENS, **extra}
        path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return vlm


def point_at_vlm(folder: Path, name: str) -> None:
    """Make config.json (SmolVLA's vlm_model_name) and the preprocessor's tokenizer_name say `name`."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("type") == "smolvla":
        config["vlm_model_name"] = name
        path.write_text(json.dumps(config, indent=2) + "\n")
    set_tokenizer_name(folder, name)


@dataclass(frozen=True)
class RelinkConfig:
    folder: tyro.conf.Positional[str]
    """A merged export that holds vlm/."""
    name: str | None = None
    """What to name the backbone: default the absolute path of FOLDER/vlm; or a Hub repo id holding its files."""


def main(argv: list[str] | None = None) -> str:
    cfg = tyro.cli(RelinkConfig, args=argv, description="Point a moved export's LeRobot names at its vlm/ folder.")
    folder = Path(cfg.folder)
    if not (folder / VLM_DIR).is_dir():
        sys.exit(f"error: {folder} has no {VLM_DIR}/ folder: only exports of a custom backbone need relinking (a Hub "
                 "backbone is named by its Hub id)")
    name = cfg.name or str((folder / VLM_DIR).resolve())
    point_at_vlm(folder, name)
    print(f"{folder}: LeRobot loads the backbone and tokenizer from {name}")
    return name


if __name__ == "__main__":
    main()
