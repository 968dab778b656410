"""The built-in demo: a small SmolVLA pretrained in full on one robot, then LoRA-tuned onto a new embodiment.

Everything is made locally and offline: a byte-level BPE tokenizer trained on the task vocabulary, two LeRobotDataset
v3.0 folders (videos encoded with a real codec) of the "move to the <color> ball" task, one recorded on the
pretraining robot and one on a robot whose motor axes are wired inverted, and a tiny SmolVLA (same code and module
names as the 450M one) trained in full on the first and saved in LeRobot's format. The fine-tune then starts from
that folder like any user's run. Assets are reused while the demo options that made them are unchanged.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .config import (
    PEFT_METHOD_FULL,
    CheckpointOptions,
    DataOptions,
    OptimOptions,
    PeftOptions,
    PolicyOptions,
    TrainConfig,
)
from .data import COLORS, instruction, load_dataset_meta, make_synthetic_dataset
from .policies import make_policy, save_policy
from .policies.smolvla import SmolVLAConfig

IMAGE_SIZE = 64
CHUNK_SIZE = 10

# A SmolVLM small enough to pretrain in a few minutes on two CPU cores; the layout is the 500M one's. 16-pixel patches
# and no pixel shuffle give one image token per bin of the task's 4x4 grid. The text width (which sets the expert's)
# matters most: at 96 the policy never learned to pick the named ball within the budget, at 192 it does.
TINY_VLM = {
    "scale_factor": 1,
    "image_token_id": 1,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "llama", "hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 4,
        "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 512,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "pad_token_id": 0, "tie_word_embeddings": False,
    },
    "vision_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": IMAGE_SIZE, "patch_size": 16, "num_channels": 3,
    },
}
# Std of the vision tower's initial position embeddings. At transformers' default (0.02) they are ten times smaller
# than the patch content, and a from-scratch tower then takes far longer to learn where a ball is.
POSITION_EMBEDDING_INIT_STD = 1.0


def train_tokenizer(folder: Path, vocab_size: int = 512, corpus: Sequence[str] | None = None) -> Path:
    """A byte-level BPE tokenizer trained on the demo's instructions (or `corpus`), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if corpus is None:
        corpus = [instruction(c) + "\n" for c in COLORS] * 20 + ["pick place push move the ball cube to red"]
    else:
        corpus = [line + "\n" for line in corpus] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return folder


def tiny_smolvla_config(meta) -> SmolVLAConfig:
    state_dim = meta.features["observation.state"]["shape"][0]
    action_dim = meta.features["action"]["shape"][0]
    cameras = {k: {"type": "VISUAL", "shape": [3, IMAGE_SIZE, IMAGE_SIZE]} for k in meta.camera_keys}
    return SmolVLAConfig(
        input_features={**cameras, "observation.state": {"type": "STATE", "shape": [state_dim]}},
        output_features={"action": {"type": "ACTION", "shape": [action_dim]}},
        chunk_size=CHUNK_SIZE, n_action_steps=CHUNK_SIZE // 2,  # replan halfway through each chunk
        resize_imgs_with_padding=(IMAGE_SIZE, IMAGE_SIZE),
        tokenizer_max_length=16, num_vlm_layers=4, vlm_model_name="finetune/tiny-smolvlm", num_steps=10,
        freeze_vision_encoder=False, train_expert_only=False,  # the base is pretrained from scratch: all of it trains
    )


def make_initial_policy(folder: Path, meta, seed: int) -> Path:
    """A randomly initialized tiny SmolVLA in LeRobot's format, with its tokenizer beside it."""
    torch.manual_seed(seed)
    policy = make_policy(tiny_smolvla_config(meta), TINY_VLM)
    with torch.no_grad():
        policy.model.vlm_with_expert.vlm.model.vision_model.embeddings.position_embedding.weight.normal_(
            0.0, POSITION_EMBEDDING_INIT_STD)
    save_policy(policy, folder)
    train_tokenizer(folder)
    return folder


def prepare_demo(cfg: TrainConfig, accelerator: Accelerator, run_training) -> TrainConfig:
    """Make (or reuse) the demo's datasets and base policy; return the fine-tuning config pointing at them."""
    assets = Path(cfg.demo.assets_dir)
    pretrain_ds, finetune_ds = assets / "pretrain_dataset", assets / "finetune_dataset"
    base = assets / "base_policy"
    d = cfg.demo
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            discard_stale_assets(assets, d, cfg.seed)
            for root, colors, seed, sign, episodes in (
                    (pretrain_ds, d.pretrain_colors, 1, 1.0, d.pretrain_episodes),
                    (finetune_ds, d.finetune_colors, 2, d.finetune_action_sign, d.finetune_episodes)):
                if not (root / "meta" / "info.json").is_file():
                    shutil.rmtree(root, ignore_errors=True)
                    accelerator.print(f"demo: writing synthetic dataset {root} (targets: {', '.join(colors)})")
                    make_synthetic_dataset(root, num_episodes=episodes, target_colors=list(colors), seed=seed,
                                           image_size=IMAGE_SIZE, action_sign=sign)

    if not (base / "model.safetensors").is_file():
        init = assets / "initial_policy"
        if accelerator.is_main_process:
            make_initial_policy(init, load_dataset_meta(pretrain_ds), seed=cfg.seed)
            shutil.rmtree(assets / "pretrain_run", ignore_errors=True)  # an interrupted attempt starts over
        accelerator.wait_for_everyone()
        accelerator.print(f"demo: pretraining the base policy in full for {d.pretrain_steps} steps")
        pretrain = TrainConfig(
            policy=PolicyOptions(path=str(init)),
            peft=PeftOptions(method=PEFT_METHOD_FULL),
            dataset=DataOptions(root=str(pretrain_ds), eval_episodes=4),
            optim=OptimOptions(lr=1e-3, decay_lr=1e-4, warmup_steps=30, weight_decay=0.0),
            checkpoint=CheckpointOptions(every=d.pretrain_steps, keep_last=1),
            output_dir=str(assets / "pretrain_run"),
            steps=d.pretrain_steps, batch_size=d.pretrain_batch_size, seed=cfg.seed, log_every=25,
            eval_every=d.pretrain_steps, eval_batches=2,
        )
        summary: dict[str, Any] = run_training(pretrain, accelerator)
        if accelerator.is_main_process:
            export_base(Path(summary["checkpoint"]), init, base)
        accelerator.wait_for_everyone()

    return replace(cfg, policy=replace(cfg.policy, path=str(base)), dataset=replace(cfg.dataset, root=str(finetune_ds)))


# Bump when the demo's task, model or recipe changes, so assets made by an older version are rebuilt.
ASSETS_VERSION = 2


def discard_stale_assets(assets: Path, d, seed: int) -> None:
    """Delete assets built with other demo options (or by another version), so changed flags take effect."""
    recipe = {k: v for k, v in asdict(d).items() if k not in ("enabled", "assets_dir", "rollout_episodes")}
    recipe = json.loads(json.dumps({**recipe, "seed": seed, "version": ASSETS_VERSION}))
    stamp = assets / "demo_recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return
    for name in ("pretrain_dataset", "finetune_dataset", "initial_policy", "pretrain_run", "base_policy"):
        shutil.rmtree(assets / name, ignore_errors=True)
    assets.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(recipe, indent=2) + "\n")


def export_base(checkpoint: Path, init: Path, base: Path) -> None:
    """The pretrained policy as a LeRobot-format folder (weights, config, backbone, tokenizer, stats)."""
    tmp = base.with_name(base.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    for name in ("model.safetensors", "config.json", "normalization_stats.safetensors"):
        shutil.copy2(checkpoint / name, tmp / name)
    (tmp / "demo.json").write_text(json.dumps({"pretrained_from": str(checkpoint)}, indent=2) + "\n")
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)


def report_closed_loop(cfg: TrainConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """The demo's last step: the base (the run's step 0) and the fine-tuned policy on the same seeded episodes of the
    new colors; prints the success rates and writes closed_loop.json, rollout GIFs and metrics.png to output_dir/eval.
    """
    from .eval import closed_loop, settings_from_dataset, success_line  # evaluation code, not training's
    from .predict import Predictor

    n = cfg.demo.rollout_episodes
    if n <= 0:
        return {}
    settings = settings_from_dataset(cfg.dataset.roots[0], cfg.demo.finetune_colors, episodes=n, seed=0)
    checkpoint = summary["checkpoint"]
    predictors = {"before": Predictor.from_checkpoint(checkpoint, cfg.policy.path, use_trained_weights=False),
                  "after": Predictor.from_checkpoint(checkpoint, cfg.policy.path)}
    out_dir = Path(cfg.output_dir) / "eval"
    result = closed_loop(predictors, settings, out_dir, Path(cfg.output_dir), checkpoint)
    summary.update(success_before=result["before"]["success_rate"], success_after=result["after"]["success_rate"])
    print(success_line(result))
    print(f"rollout GIFs and metrics plot in {out_dir}")
    return result
