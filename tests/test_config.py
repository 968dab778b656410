"""Presets parse, flags override, and bad values are refused with a clear message before any model is built."""

from __future__ import annotations

import dataclasses

import pytest

from finetune import train
from finetune.config import PRESETS, TrainConfig, cli, from_dict, to_dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses_and_round_trips(name):
    cfg = cli([name])
    assert isinstance(cfg, TrainConfig)
    assert cfg == PRESETS[name][1]
    assert from_dict(to_dict(cfg)) == cfg


def test_flags_override_the_preset():
    cfg = cli(["smolvla_lora", "--output-dir", "runs/x", "--steps", "7", "--batch-size", "3", "--seed", "5",
               "--resume", "--policy.path", "/p", "--dataset.root", "/d", "--dataset.repo-id", "org/ds",
               "--peft.method", "LOHA", "--peft.r", "8", "--peft.lora-alpha", "16", "--peft.target-modules", "q_proj",
               "v_proj", "--peft.full-training-modules", "action_out_proj", "--peft.init-type", "gaussian",
               "--dataset.rename-map", "observation.images.front", "observation.images.top",
               "--peft.use-rslora", "True", "--peft.rank-pattern", "q_proj", "4"])
    assert (cfg.output_dir, cfg.steps, cfg.batch_size, cfg.seed, cfg.resume) == ("runs/x", 7, 3, 5, True)
    assert (cfg.policy.path, cfg.dataset.root, cfg.dataset.repo_id) == ("/p", ("/d",), "org/ds")
    assert dataclasses.asdict(cfg.peft) == {
        "method": "LOHA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "init_type": "gaussian",
        "target_modules": ("q_proj", "v_proj"), "full_training_modules": ("action_out_proj",), "use_dora": False,
        "use_rslora": True, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {}, "init_from": None}
    assert cfg.dataset.rename_map == {"observation.images.front": "observation.images.top"}
    # the preset keeps LeRobot's SmolVLA LoRA recipe where not overridden
    assert (cfg.optim.lr, cfg.optim.decay_lr, cfg.optim.betas, cfg.optim.grad_clip_norm) == (1e-3, 1e-4, (0.9, 0.95),
                                                                                             10.0)


# The recipes the presets are named after, written here from their sources (not read from config.py):
# - LeRobot SmolVLAConfig defaults (src/lerobot/policies/smolvla/configuration_smolvla.py): AdamW betas (0.9, 0.95),
#   eps 1e-8, weight decay 1e-10, grad clip 10, 1000 warmup steps, cosine decay over 30000 steps; chunk 50.
# - LeRobot's PEFT guide (docs "PEFT training", SmolVLA quick start): --peft.method_type=LORA --peft.r=64
#   --policy.optimizer_lr=1e-3 --policy.scheduler_decay_lr=1e-4 --batch_size=32 --steps=50000.
# - LeRobot pi0/pi0.5 configs (the openpi port: "see openpi AdamW / CosineDecaySchedule"): lr 2.5e-5, betas
#   (0.9, 0.95), eps 1e-8, weight decay 0.01, grad clip 1.0, 1000 warmup, cosine to 2.5e-6 over 30000 steps; with
#   the PEFT guide's x10 on peak and final lr for LoRA. Batch 32 (pi0) / 64 (pi0.5) as config.py cites LeRobot's
#   pi0/pi0.5 docs (not re-checked here).
SMOLVLA_LORA_RECIPE = {"peft.method": "LORA", "peft.r": 64, "optim.lr": 1e-3, "optim.decay_lr": 1e-4,
                       "optim.betas": [0.9, 0.95], "optim.eps": 1e-8, "optim.weight_decay": 1e-10,
                       "optim.grad_clip_norm": 10.0, "optim.warmup_steps": 1000, "effective_decay_steps": 30_000,
                       "batch_size": 32, "steps": 50_000, "peft.target_modules": None}
PI_LORA_RECIPE = {"peft.method": "LORA", "optim.lr": 2.5e-4, "optim.decay_lr": 2.5e-5, "optim.betas": [0.9, 0.95],
                  "optim.eps": 1e-8, "optim.weight_decay": 0.01, "optim.grad_clip_norm": 1.0,
                  "optim.warmup_steps": 1000, "effective_decay_steps": 30_000, "steps": 30_000,
                  "peft.target_modules": None}
RECIPES = {
    "smolvla_lora": SMOLVLA_LORA_RECIPE,
    "smolvla_qlora8": {**SMOLVLA_LORA_RECIPE, "quant.load_in_8bit": True},
    "smolvla_qlora4": {**SMOLVLA_LORA_RECIPE, "quant.load_in_4bit": True, "quant.quant_type": "nf4"},
    "pi0_lora": {**PI_LORA_RECIPE, "batch_size": 32, "policy.dtype": "bfloat16", "policy.gradient_checkpointing": True},
    "pi05_lora": {**PI_LORA_RECIPE, "batch_size": 64, "policy.dtype": "bfloat16",
                  "policy.gradient_checkpointing": True},
    "pi0_qlora8": {**PI_LORA_RECIPE, "batch_size": 32, "quant.load_in_8bit": True},
    "pi0_qlora4": {**PI_LORA_RECIPE, "batch_size": 32, "quant.load_in_4bit": True},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_presets_follow_the_recipes_they_are_named_after(name):
    from finetune.config import flat_fields

    cfg = PRESETS[name][1]
    fields = flat_fields(cfg)
    fields["effective_decay_steps"] = cfg.optim.decay_steps or cfg.steps  # the cosine spans this many updates
    recipe = RECIPES[name]
    assert {k: fields[k] for k in recipe} == recipe
    # the learning rate the run sees at a few updates, from the recipe's own numbers (LeRobot's schedule)
    from finetune.training.optim import get_lr_factor

    for step in (0, 500, 1000, 15_000, recipe["effective_decay_steps"], recipe["steps"]):
        warm, decay = recipe["optim.warmup_steps"], recipe["effective_decay_steps"]
        expected = (1 / (warm + 1) - 1) * (1 - step / warm) + 1 if 0 < step < warm else 1 / (warm + 1) if step == 0 \
            else recipe["optim.decay_lr"] / recipe["optim.lr"] + (1 - recipe["optim.decay_lr"] / recipe["optim.lr"]) \
            * 0.5 * (1 + __import__("math").cos(__import__("math").pi * min(step, decay) / decay))
        got = get_lr_factor(step, cfg.optim.warmup_steps, fields["effective_decay_steps"], cfg.optim.lr,
                            cfg.optim.decay_lr)
        assert got * cfg.optim.lr == pytest.approx(expected * recipe["optim.lr"], rel=1e-9), step


def test_resume_takes_a_bare_flag_or_auto():
    assert cli(["smolvla_lora"]).resume is False
    assert cli(["smolvla_lora", "--resume"]).resume is True
    assert cli(["smolvla_lora", "--resume", "--steps", "3"]).resume is True
    assert cli(["smolvla_lora", "--resume", "auto", "--steps", "3"]).resume == "auto"
    cfg = cli(["smolvla_lora", "--resume", "auto"])
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(SystemExit) as exit_info:
        cli(["smolvla_lora", "--resume", "sometimes"])
    assert exit_info.value.code == 2


def test_help_is_readable(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["smolvla_lora", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--output-dir", "--steps", "--batch-size", "--seed", "--resume", "--policy.path", "--dataset.root",
                 "--dataset.repo-id", "--peft.method", "--peft.r", "--peft.target-modules"):
        assert flag in out, flag
    assert "LeRobot-format folder" in out  # field docstrings are the help text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optim.lr", "-1e-3"], r"--optim.lr must be > 0, got -0.001"),
        (["--peft.r", "0"], r"--peft.r must be > 0, got 0"),
        (["--peft.method", "SUPERLORA"], r"unknown --peft.method 'SUPERLORA'; choose one of .*LORA"),
        (["--steps", "0"], r"--steps must be >= 1, got 0"),
        (["--dataset.root", "/no/such/dataset"], r"--dataset.root /no/such/dataset does not exist"),
        (["--peft.method", "PROMPT_TUNING"], r"does not adapt linear layers"),
        (["--peft.target-modules", "no_such_proj"], r"matches no adaptable .*Nearby names"),
        (["--resume"], r"--resume: no checkpoint at"),
        (["--resume", "auto", "--overwrite"], r"--resume and --overwrite exclude each other"),
        (["--log-with", "tensorbored"], r"unknown --log-with tensorbored; choose from tensorboard wandb"),
        (["--log-with", "tensorboard", "mlflow"], r"--log-with mlflow: the mlflow package is not installed"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(flags, message, policy_dir, dataset_root, tmp_path, capsys):
    args = ["smolvla_lora", "--policy.path", str(policy_dir), "--dataset.root", str(dataset_root),
            "--output-dir", str(tmp_path / "run"), "--steps", "2", *flags]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_dataset_root_is_refused_before_building(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        train.main(["smolvla_lora", "--policy.path", "x", "--dataset.root", str(tmp_path / "empty")])
    assert "has no meta/info.json" in capsys.readouterr().err
