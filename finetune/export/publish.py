"""Pushing a run to the Hugging Face Hub (`--policy.repo-id`, `--policy.merged-repo-id`).

Pushing is checked before training (finetune.hub.check_can_push: offline or not logged in is an error then, not after
hours of training) and done at the end of the run on the main process; finetune.train imports this module only then.
The cards and the upload live in finetune.export.model_card (shared with finetune-merge --push-to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.export.model_card import adapter_card, published_checkpoint_files, push_folder


def push_adapter_checkpoint(checkpoint: Path, repo_id: str) -> str:
    checkpoint = Path(checkpoint).resolve()
    return push_folder(checkpoint, repo_id, readme=adapter_card(checkpoint),
                       files=published_checkpoint_files(checkpoint),
                       commit_message=f"Upload adapter checkpoint {checkpoint.name}")


def push_run(cfg: TrainConfig, summary: dict[str, Any]) -> dict[str, str]:
    """At the end of a run: push the last checkpoint to --policy.repo-id and, when asked, the merged policy."""
    checkpoint = Path(summary["checkpoint"])
    pushed = {}
    if cfg.policy.repo_id:
        pushed["adapter"] = push_adapter_checkpoint(checkpoint, cfg.policy.repo_id)
        print(f"pushed the checkpoint to {pushed['adapter']}")
    if cfg.policy.merged_repo_id:
        from finetune.export.merge import merge_checkpoint, push_merged  # only when a merged push is asked

        merged = merge_checkpoint(checkpoint, Path(cfg.output_dir) / "merged", base=cfg.policy.path,
                                  tokenizer_path=cfg.policy.tokenizer_path)
        pushed["merged"] = push_merged(merged, cfg.policy.merged_repo_id)
        print(f"pushed the merged policy to {pushed['merged']}")
    summary["pushed"] = pushed
    return pushed
