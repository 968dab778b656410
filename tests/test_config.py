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
               "--dataset.rename-map", "observation.images.front", "observation.images.top"])
    assert (cfg.output_dir, cfg.steps, cfg.batch_size, cfg.seed, cfg.resume) == ("runs/x", 7, 3, 5, True)
    assert (cfg.policy.path, cfg.dataset.root, cfg.dataset.repo_id) == ("/p", ("/d",), "org/ds")
    assert dataclasses.asdict(cfg.peft) == {
        "method": "LOHA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "init_type": "gaussian",
        "target_modules": ("q_proj", "v_proj"), "full_training_modules": ("action_out_proj",)}
    assert cfg.dataset.rename_map == {"observation.images.front": "observation.images.top"}
    # the preset keeps LeRobot's SmolVLA LoRA recipe where not overridden
    assert (cfg.optim.lr, cfg.optim.decay_lr, cfg.optim.betas, cfg.optim.grad_clip_norm) == (1e-3, 1e-4, (0.9, 0.95),
                                                                                             10.0)


def test_smolvla_lora_preset_is_lerobots_recipe():
    cfg = PRESETS["smolvla_lora"][1]
    assert (cfg.peft.method, cfg.peft.r, cfg.batch_size, cfg.optim.warmup_steps) == ("LORA", 64, 32, 1000)
    assert cfg.peft.target_modules is None  # the policy's default targets


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
