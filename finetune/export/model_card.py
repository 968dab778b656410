"""Model cards (with the run metrics they quote) and the Hub upload that merge and publish share.

The card says what a user needs to trust and load the weights: the base, the adapter config, the dataset and the
run's metrics. Lower than merge.py and publish.py (it imports neither), so they can both use it without a cycle.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig, read_train_config
from finetune.hub import REPO_ID_RE
from finetune.training.metrics import run_dir_of, run_metrics

# What an adapter checkpoint holds that is worth publishing (training_state/ is the optimizer: resume-only, large).
PUBLISHED_CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json",
                              "vlm_config.json", "normalization_stats.safetensors", "train_config.json",
                              "accelerate_config.yaml", "trainer_state.json")


def published_checkpoint_files(checkpoint: Path) -> tuple[str, ...]:
    """What an adapter checkpoint's Hub repo holds: PUBLISHED_CHECKPOINT_FILES and LeRobot's processor files (its
    PEFT loading reads the stats and the tokenizer name from them; the state files' step numbers vary by type)."""
    processor_files = sorted(p.name for p in Path(checkpoint).glob("policy_*processor*") if p.is_file())
    return PUBLISHED_CHECKPOINT_FILES + tuple(processor_files)


def _hub_id(value: str | None) -> str | None:
    """`value` when it reads as a Hub id (org/name), not a local path."""
    if value and REPO_ID_RE.match(value) and "/" in value and not Path(value).expanduser().exists():
        return value
    return None


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    first, last = metrics.get("heldout_action_mse_first"), metrics.get("heldout_action_mse_last")
    if first and last:
        lines.append(f"- held-out action MSE (normalized units): {first['value']:.4f} at step {first['step']} -> "
                     f"{last['value']:.4f} at step {last['step']}")
    if "train_loss_last" in metrics:
        lines.append(f"- last training loss: {metrics['train_loss_last']['value']:.4f} "
                     f"(step {metrics['train_loss_last']['step']})")
    offline = metrics.get("offline_eval")
    if offline:
        lines.append(f"- offline eval on {offline.get('frames')} held-out frames: action MSE "
                     f"{offline.get('action_mse'):.5f}, L1 {offline.get('action_l1'):.5f} (robot units)")
    closed = metrics.get("closed_loop")
    if closed:
        for name in ("before", "after"):
            if name in closed:
                r = closed[name]
                lines.append(f"- closed-loop success {name} fine-tuning: {r['success_rate']:.0%} over "
                             f"{r['episodes']} seeded episodes")
    return lines or ["- no metrics recorded"]


def model_card(*, kind: str, policy_config: dict[str, Any], train_cfg: TrainConfig | None,
               adapter_config: dict[str, Any] | None, metrics: dict[str, Any], base: str | None,
               notes: list[str] | None = None) -> str:
    """README.md for an adapter checkpoint (`kind="adapter"`) or a merged policy (`kind="merged"`)."""
    policy_type = policy_config.get("type", "policy")
    base_name = base or (train_cfg.policy.path if train_cfg else None) or "unknown"
    dataset = None
    if train_cfg is not None:
        dataset = " + ".join(train_cfg.dataset.roots) if train_cfg.dataset.roots else train_cfg.dataset.repo_id
    header = ["---", "library_name: lerobot" if kind == "merged" else "library_name: peft", "pipeline_tag: robotics",
              "tags:", "- lerobot", "- robotics", f"- {policy_type}"]
    if adapter_config:
        header.append(f"- {str(adapter_config.get('peft_type', 'adapter')).lower()}")
    if _hub_id(base_name):
        header.append(f"base_model: {base_name}")
    if _hub_id(dataset):
        header += ["datasets:", f"- {dataset}"]
    header.append("---")
    what = ("A full policy in LeRobot's format: the adapter below merged into its base." if kind == "merged" else
            "A PEFT adapter for the base policy below (only the trained weights).")
    lines = [*header, "", f"# {policy_type} fine-tuned with finetune", "", what, "",
             f"- policy type: `{policy_type}`", f"- base: `{base_name}`", f"- dataset: `{dataset or 'unknown'}`"]
    features = policy_config.get("input_features", {})
    if features:
        inputs = ", ".join(f"`{k}` {v.get('shape')}" for k, v in features.items())
        action = policy_config.get("output_features", {}).get("action", {}).get("shape")
        lines.append(f"- inputs: {inputs}; action: {action}, chunk {policy_config.get('chunk_size')}")
    if train_cfg is not None:
        q = train_cfg.quant
        quant = "8-bit" if q.load_in_8bit else f"4-bit {q.quant_type}" if q.load_in_4bit else "none"
        lines.append(f"- training: {train_cfg.steps} steps, batch {train_cfg.batch_size}, lr {train_cfg.optim.lr}, "
                     f"seed {train_cfg.seed}, quantized base: {quant}")
    if adapter_config:
        targets = adapter_config.get("target_modules")
        if isinstance(targets, list):
            shown = f"({len(targets)}): " + ", ".join(targets[:6]) + (", ..." if len(targets) > 6 else "")
        else:
            shown = f"(pattern): {targets}"
        lines += ["", "## Adapter", "",
                  f"- method: {adapter_config.get('peft_type')}, r {adapter_config.get('r')}, "
                  f"alpha {adapter_config.get('lora_alpha', adapter_config.get('alpha'))}, "
                  f"dropout {adapter_config.get('lora_dropout')}",
                  f"- target modules {shown}",
                  f"- fully trained modules: {adapter_config.get('modules_to_save') or 'none'}"]
    lines += ["", "## Metrics", "", *_metric_lines(metrics)]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    lines += ["", "## Use", ""]
    if kind == "merged":
        lines += ["```python", "from finetune.inference.predict import Predictor",
                  "predictor = Predictor.from_checkpoint(PATH)",
                  "actions = predictor({'observation.images.top': image, 'observation.state': state, "
                  "'task': 'instruction'})", "```", "",
                  "LeRobot loads the folder as it is (config.json, model.safetensors, policy_preprocessor.json, "
                  "policy_postprocessor.json)."]
    else:
        lines += ["```python", "from finetune.inference.predict import Predictor",
                  "predictor = Predictor.from_checkpoint(PATH, base=BASE)", "```", "",
                  f"or merge it into the base: `finetune-merge --base {base_name} --checkpoint PATH --output-dir DIR`."]
    return "\n".join(lines) + "\n"


def adapter_card(checkpoint: Path) -> str:
    checkpoint = Path(checkpoint)
    train_cfg = read_train_config(checkpoint)
    adapter_path = checkpoint / "adapter_config.json"
    return model_card(kind="adapter", policy_config=json.loads((checkpoint / "config.json").read_text()),
                      train_cfg=train_cfg,
                      adapter_config=json.loads(adapter_path.read_text()) if adapter_path.is_file() else None,
                      metrics=run_metrics(run_dir_of(checkpoint)), base=None)


# --- the Hub ----------------------------------------------------------------------------------------------------------

def push_folder(folder: Path, repo_id: str, *, readme: str | None = None, files: tuple[str, ...] | None = None,
                commit_message: str = "Upload policy", private: bool | None = None) -> str:
    """Upload `folder` (or only its `files`, plus subfolders listed there) to the model repo `repo_id`.

    The upload goes from a staging copy so the card can be replaced without touching the checkpoint.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="finetune-push-") as tmp:
        staging = Path(tmp) / "upload"
        staging.mkdir()
        for path in sorted(folder.iterdir()):
            if files is not None and path.name not in files:
                continue
            if path.is_dir():
                shutil.copytree(path, staging / path.name)
            else:
                shutil.copy2(path, staging / path.name)
        if readme is not None:
            (staging / "README.md").write_text(readme)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(staging), repo_type="model", commit_message=commit_message)
    return f"https://huggingface.co/{repo_id}"
