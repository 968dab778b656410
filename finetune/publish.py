"""Pushing a run to the Hugging Face Hub (`--policy.repo-id`, `--policy.merged-repo-id`).

Pushing is checked before training (offline or not logged in is an error then, not after hours of training) and done
at the end of the run on the main process. The cards and the upload itself live in finetune.model_card (shared with
finetune-merge --push-to); this module adds what needs the merge: the merged policy of a finished run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TrainConfig
from .model_card import (  # noqa: F401  (re-exported: the names callers import from here)
    CLOSED_LOOP_FILE,
    OFFLINE_METRICS_FILE,
    PUBLISHED_CHECKPOINT_FILES,
    REPO_ID_RE,
    adapter_card,
    check_can_push,
    model_card,
    push_folder,
    read_train_config,
    run_dir_of,
    run_metrics,
)


def push_repo_ids(cfg: TrainConfig) -> list[str]:
    return [r for r in (cfg.policy.repo_id, cfg.policy.merged_repo_id) if r]


def check_push_access(cfg: TrainConfig) -> None:
    """Before training: refuse a push that cannot happen (offline, not logged in, malformed id)."""
    check_can_push(push_repo_ids(cfg), "--policy.repo-id")


def push_adapter_checkpoint(checkpoint: Path, repo_id: str) -> str:
    checkpoint = Path(checkpoint).resolve()
    return push_folder(checkpoint, repo_id, readme=adapter_card(checkpoint), files=PUBLISHED_CHECKPOINT_FILES,
                       commit_message=f"Upload adapter checkpoint {checkpoint.name}")


def push_run(cfg: TrainConfig, summary: dict[str, Any]) -> dict[str, str]:
    """At the end of a run: push the last checkpoint to --policy.repo-id and, when asked, the merged policy."""
    checkpoint = Path(summary["checkpoint"])
    pushed = {}
    if cfg.policy.repo_id:
        pushed["adapter"] = push_adapter_checkpoint(checkpoint, cfg.policy.repo_id)
        print(f"pushed the checkpoint to {pushed['adapter']}")
    if cfg.policy.merged_repo_id:
        from .merge import merge_checkpoint  # only when a merged push is asked (train.py imports this module)

        merged = merge_checkpoint(checkpoint, Path(cfg.output_dir) / "merged", base=cfg.policy.path,
                                  tokenizer_path=cfg.policy.tokenizer_path)
        pushed["merged"] = push_folder(merged, cfg.policy.merged_repo_id, commit_message="Upload merged policy")
        print(f"pushed the merged policy to {pushed['merged']}")
    summary["pushed"] = pushed
    return pushed
