"""The built-in demo: a small SmolVLA pretrained in full on one robot, then LoRA-tuned onto a new embodiment.

Everything is made locally and offline: a byte-level BPE tokenizer trained on the task vocabulary, two LeRobotDataset
v3.0 folders (videos encoded with a real codec) of the "move to the <color> ball" task, one recorded on the
pretraining robot and one on a robot whose motor axes are wired inverted, and a tiny SmolVLA (same code and module
names as the 450M one) trained in full on the first and saved in LeRobot's format. The fine-tune then starts from
that folder like any user's run. Assets are reused while the demo options that made them are unchanged.

    accelerate launch --config_file accelerate_configs/cpu.yaml finetune/demo.py [--rollout-episodes 50] [--train.*]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `finetune` importable and keep finetune/ off the path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import tyro
from accelerate import PartialState

from finetune import (
    _quiet,  # noqa: F401 - first: silences notices raised while peft imports bitsandbytes
    train,
)
from finetune.config import (
    PEFT_METHOD_FULL,
    CheckpointOptions,
    DataOptions,
    OptimOptions,
    PeftOptions,
    PolicyOptions,
    TrainConfig,
)
from finetune.data import COLORS, instruction, load_dataset_meta, make_synthetic_dataset
from finetune.logs import setup_logging
from finetune.policies import make_policy, save_policy
from finetune.policies.smolvla import SmolVLAConfig
from finetune.training.run_dir import move_aside, run_contents
from finetune.training.run_lock import RunLock

log = logging.getLogger("finetune.demo")  # not __name__: "__main__" when run as a script

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


# The LoRA fine-tune onto the inverted robot: r 16 on SmolVLA's default targets, a short high-lr schedule.
FINETUNE = TrainConfig(
    peft=PeftOptions(method="LORA", r=16, lora_alpha=32, full_training_modules=()),
    dataset=DataOptions(eval_episodes=8),
    optim=OptimOptions(lr=3e-3, decay_lr=3e-4, warmup_steps=20, grad_clip_norm=10.0),
    checkpoint=CheckpointOptions(every=100, keep_last=2),
    output_dir="runs/demo",
    steps=600,
    batch_size=32,
    seed=0,
    log_every=10,
    eval_every=100,
    eval_batches=2,
)


@dataclass(frozen=True)
class DemoConfig:
    """The built-in demo: datasets and a base made locally, then a LoRA fine-tune through finetune.train like any
    user's run (`--train.*` sets any training flag of that fine-tune)."""

    assets_dir: str = "runs/demo_assets"
    """Where the demo's base policy and datasets are written (reused while the options that made them hold)."""
    pretrain_steps: int = 4000
    """Full-training steps of the tiny base policy on the pretraining robot."""
    pretrain_batch_size: int = 16
    """Batch size of the base's pretraining (more, smaller steps learned faster per CPU second than batch 32)."""
    pretrain_colors: tuple[str, ...] = ("red", "green", "blue")
    """Target colors of the pretraining dataset."""
    finetune_colors: tuple[str, ...] = ("red", "green", "blue")
    """Target colors of the fine-tuning dataset (and of the closed-loop rollouts)."""
    finetune_action_sign: float = -1.0
    """The fine-tuning robot's command sign: -1 is a robot whose motor axes are wired inverted (a new embodiment
    the base has never driven), +1 the pretraining robot."""
    pretrain_episodes: int = 1000
    """Episodes in the pretraining dataset (scene variety is what teaches the base to find the named ball)."""
    finetune_episodes: int = 200
    """Episodes in the fine-tuning dataset."""
    rollout_episodes: int = 50
    """Seeded closed-loop episodes in the simulated task, run with the base and the fine-tuned policy at the end
    (success rate before/after, a GIF and a plot in the run's eval/ folder); 0 skips it."""
    train: TrainConfig = FINETUNE
    """The LoRA fine-tune (its --train.policy.path and --train.dataset.root are set to the demo's assets)."""


def prepare_assets(cfg: DemoConfig) -> tuple[Path, Path]:
    """Make (or reuse) the demo's datasets and base policy; returns the base policy folder and the fine-tuning
    dataset. The base is pretrained in full through finetune.train.run like any other run."""
    state = PartialState()
    assets = Path(cfg.assets_dir)
    pretrain_ds, finetune_ds = assets / "pretrain_dataset", assets / "finetune_dataset"
    base = assets / "base_policy"
    seed = cfg.train.seed
    with state.main_process_first():
        if state.is_main_process:
            discard_stale_assets(assets, cfg, seed)
            for root, colors, data_seed, sign, episodes in (
                    (pretrain_ds, cfg.pretrain_colors, 1, 1.0, cfg.pretrain_episodes),
                    (finetune_ds, cfg.finetune_colors, 2, cfg.finetune_action_sign, cfg.finetune_episodes)):
                if not (root / "meta" / "info.json").is_file():
                    shutil.rmtree(root, ignore_errors=True)
                    log.info(f"demo: writing synthetic dataset {root} (targets: {', '.join(colors)})")
                    make_synthetic_dataset(root, num_episodes=episodes, target_colors=list(colors), seed=data_seed,
                                           image_size=IMAGE_SIZE, action_sign=sign)

    if not (base / "model.safetensors").is_file():
        init = assets / "initial_policy"
        if state.is_main_process:
            make_initial_policy(init, load_dataset_meta(pretrain_ds), seed=seed)
            shutil.rmtree(assets / "pretrain_run", ignore_errors=True)  # an interrupted attempt starts over
        state.wait_for_everyone()
        if state.is_main_process:
            log.info(f"demo: pretraining the base policy in full for {cfg.pretrain_steps} steps")
        summary: dict[str, Any] = train.run(pretrain_config(cfg, init, pretrain_ds))
        if state.is_main_process:
            export_base(Path(summary["checkpoint"]), init, base)
        state.wait_for_everyone()
    return base, finetune_ds


def pretrain_config(cfg: DemoConfig, init: Path, dataset: Path) -> TrainConfig:
    """The base's pretraining: every parameter trains from random initialization on the pretraining robot."""
    return TrainConfig(
        policy=PolicyOptions(path=str(init)),
        peft=PeftOptions(method=PEFT_METHOD_FULL),
        dataset=DataOptions(root=str(dataset), eval_episodes=4),
        # clip 1 + a 300-step warmup: with clip 10 and 30 steps only seed 0 converged (seeds 1, 2 stalled at MSE 0.45)
        optim=OptimOptions(lr=1e-3, decay_lr=1e-4, warmup_steps=300, weight_decay=0.0, grad_clip_norm=1.0),
        checkpoint=CheckpointOptions(every=cfg.pretrain_steps, keep_last=1),
        output_dir=str(Path(cfg.assets_dir) / "pretrain_run"),
        steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size, seed=cfg.train.seed, log_every=25,
        eval_every=cfg.pretrain_steps, eval_batches=2, log_with=cfg.train.log_with,
    )


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Assets, then the LoRA fine-tune from the demo's base (its output folder starts over: the previous demo run
    moves to <output_dir>.previous), then the closed-loop report."""

    state = PartialState()
    setup_logging(cfg.train.log_level)
    base, dataset = prepare_assets(cfg)
    tune = replace(cfg.train, policy=replace(cfg.train.policy, path=str(base)),
                   dataset=replace(cfg.train.dataset, root=str(dataset)))
    out = Path(tune.output_dir)
    lock = RunLock.acquire(out) if state.is_main_process else None  # held across the move and the run
    try:
        if state.is_main_process and not tune.resume and run_contents(out):
            aside = move_aside(out, out.with_name(out.name + ".previous"))
            log.info(f"demo: starting over in {out}; the previous run there was moved to {aside}")
        state.wait_for_everyone()
        summary = train.run(tune)
    finally:
        if lock is not None:
            lock.release()
    if state.is_main_process and "checkpoint" in summary:
        report_closed_loop(tune, cfg.finetune_colors, cfg.rollout_episodes, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = tyro.cli(DemoConfig, args=argv, description=__doc__.split("\n")[0], use_underscores=False,
                   console_outputs=PartialState().is_main_process)
    with train.exit_codes():
        return run_demo(cfg)


# Bump when the demo's task, model or recipe changes, so assets made by an older version are rebuilt.
ASSETS_VERSION = 3


def discard_stale_assets(assets: Path, cfg: DemoConfig, seed: int) -> None:
    """Delete assets built with other demo options (or by another version), so changed flags take effect."""
    recipe = {k: v for k, v in asdict(cfg).items() if k not in ("assets_dir", "rollout_episodes", "train")}
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


def report_closed_loop(cfg: TrainConfig, colors: Sequence[str], episodes: int, summary: dict[str, Any]
                       ) -> dict[str, Any]:
    """The demo's last step: the base (the run's step 0) and the fine-tuned policy on the same seeded episodes of the
    new colors; prints the success rates and writes closed_loop.json, rollout GIFs and metrics.png to output_dir/eval.
    """
    from finetune.eval import closed_loop, settings_from_dataset, success_line
    from finetune.inference.predict import Predictor

    if episodes <= 0:
        return {}
    settings = settings_from_dataset(cfg.dataset.roots[0], colors, episodes=episodes, seed=0)
    checkpoint = summary["checkpoint"]
    predictors = {"before": Predictor.from_checkpoint(checkpoint, cfg.policy.path, use_trained_weights=False),
                  "after": Predictor.from_checkpoint(checkpoint, cfg.policy.path)}
    out_dir = Path(cfg.output_dir) / "eval"
    result = closed_loop(predictors, settings, out_dir, Path(cfg.output_dir), checkpoint)
    summary.update(success_before=result["before"]["success_rate"], success_after=result["after"]["success_rate"])
    log.info(success_line(result))
    log.info(f"rollout GIFs and metrics plot in {out_dir}")
    return result


if __name__ == "__main__":
    main()
