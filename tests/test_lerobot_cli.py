"""LeRobot's `lerobot-train` command line (finetune/lerobot_cli.py): the PEFT guide's command, mapped and refused
flags, draccus list syntax, --config_path with a LeRobot train_config.json, and the --env.* up-front check."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_args
from safetensors.torch import load_file

from finetune import train
from finetune.config import cli
from finetune.training.metrics import read_metrics

TARGETS = (r"(model\.vlm_with_expert\.lm_expert\..*\.(down|gate|up)_proj|.*\.(state_proj|action_in_proj|"
           r"action_out_proj|action_time_mlp_in|action_time_mlp_out))")


def guide_command(policy: str = "lerobot/smolvla_base", dataset: str = "--dataset.repo_id=HuggingFaceVLA/libero",
                  steps: int = 100000, env: bool = True) -> list[str]:
    """LeRobot's PEFT guide command, flag for flag, after `finetune/train.py smolvla_lora`."""
    return [
        "smolvla_lora",
        f"--policy.path={policy}",
        "--policy.repo_id=your_hub_name/my_libero_smolvla",
        dataset,
        "--policy.output_features=null",
        "--policy.input_features=null",
        "--policy.optimizer_lr=1e-3",
        "--policy.scheduler_decay_lr=1e-4",
        *(["--env.type=libero", "--env.task=libero_spatial"] if env else []),
        f"--steps={steps}",
        "--batch_size=32",
        "--peft.method_type=LORA",
        "--peft.r=64",
        f"--peft.target_modules={TARGETS}",
        '--peft.full_training_modules=["state_proj"]',
    ]


def refused(args: list[str], capsys) -> str:
    """The one-line error of a command line that cli() refuses (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_the_guides_command_parses_to_lerobots_meaning(capsys):
    cfg = cli(guide_command())
    assert cfg.peft.method == "LORA" and cfg.peft.r == 64
    assert cfg.peft.target_modules == (TARGETS,)  # the regex untouched
    assert cfg.peft.full_training_modules == ("state_proj",)  # not one module named '["state_proj"]'
    assert cfg.optim.lr == 1e-3 and cfg.optim.decay_lr == 1e-4
    assert cfg.batch_size == 32 and cfg.steps == 100000
    assert cfg.policy.repo_id == "your_hub_name/my_libero_smolvla" and cfg.policy.path == "lerobot/smolvla_base"
    assert cfg.dataset.repo_id == "HuggingFaceVLA/libero"
    assert (cfg.env.type, cfg.env.task) == ("libero", "libero_spatial")
    out = capsys.readouterr().out
    assert "lerobot --peft.method_type=LORA -> --peft.method=LORA" in out
    assert "lerobot --policy.optimizer_lr=1e-3 -> --optim.lr=1e-3" in out
    assert "--peft.full-training-modules state_proj" in out
    # the preset already decays over LeRobot's 30000 steps (SmolVLAConfig's schedule): no difference to announce
    assert (cfg.optim.warmup_steps, cfg.optim.decay_steps) == (1000, 30000)
    assert "lerobot schedule" not in out


def test_notices_print_once_on_the_main_process_only(capsys):
    cli(guide_command(), console_outputs=False)
    assert capsys.readouterr().out == ""
    cli(guide_command(), console_outputs=True)
    assert capsys.readouterr().out.count("-> --optim.lr=1e-3") == 1


def test_the_guides_command_trains(policy_dir, dataset_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*guide_command(str(policy_dir), f"--dataset.root={dataset_root}", steps=2, env=False),
            f"--output_dir={out}", "--policy.push_to_hub=false", "--log_freq=1"]
    summary = train.main(args)
    last = out / "checkpoints" / "last"
    adapter = load_file(str(last / "adapter_model.safetensors"))
    lora = {k.split(".lora_")[0] for k in adapter if ".lora_" in k}
    assert lora and all(k.endswith(("down_proj", "gate_proj", "up_proj", "action_in_proj", "action_out_proj",
                                    "action_time_mlp_in", "action_time_mlp_out")) for k in lora), sorted(lora)
    assert not any(k.endswith(("q_proj", "v_proj")) for k in lora)  # the guide's regex, not the default targets
    assert "base_model.model.model.state_proj.weight" in adapter  # trained in full beside the adapter
    assert json.loads((last / "adapter_config.json").read_text())["modules_to_save"] == ["model.state_proj"]
    saved = json.loads((last / "train_config.json").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["optim"]["decay_lr"] == 1e-4 and saved["batch_size"] == 32
    assert (saved["optim"]["warmup_steps"], saved["optim"]["decay_steps"]) == (0, 2)  # LeRobot's shrunk schedule
    assert saved["peft"]["full_training_modules"] == ["state_proj"] and saved["policy"]["repo_id"] is None
    assert summary["trainable_params"] == sum(t.numel() for t in adapter.values())  # the checkpoint holds them all
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2]


def test_the_guides_repo_id_pushes_so_offline_it_is_refused_up_front(policy_dir, dataset_root, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    args = [*guide_command(str(policy_dir), f"--dataset.root={dataset_root}", steps=2, env=False),
            f"--output_dir={out}"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    assert "your_hub_name/my_libero_smolvla: HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was built or written


@pytest.mark.parametrize("flags, field, expected", [
    (["--peft.method_type=loha"], "peft.method", "loha"),
    (["--policy.optimizer_lr=3e-4"], "optim.lr", 3e-4),
    (["--policy.optimizer_betas=[0.9,0.99]"], "optim.betas", (0.9, 0.99)),
    (["--policy.optimizer_eps=1e-6"], "optim.eps", 1e-6),
    (["--policy.optimizer_weight_decay=0.01"], "optim.weight_decay", 0.01),
    (["--policy.optimizer_grad_clip_norm=1.0"], "optim.grad_clip_norm", 1.0),
    (["--policy.scheduler_warmup_steps=50"], "optim.warmup_steps", 50),
    (["--policy.scheduler_decay_lr=2e-5"], "optim.decay_lr", 2e-5),
    (["--policy.scheduler_decay_steps=300", "--steps=1000"], "optim.decay_steps", 300),
    (["--policy.repo_id=me/policy"], "policy.repo_id", "me/policy"),
    (["--policy.repo_id=me/policy", "--policy.push_to_hub=false"], "policy.repo_id", None),
    (["--policy.repo_id=me/policy", "--policy.push_to_hub=true"], "policy.repo_id", "me/policy"),
    (["--policy.pretrained_path=/models/smolvla"], "policy.path", "/models/smolvla"),
    (["--policy.use_amp=true"], "mixed_precision", "bf16"),  # torch.autocast's CPU default (CUDA: fp16)
    (["--policy.use_amp=false"], "mixed_precision", None),
    (["--policy.gradient_checkpointing=true"], "policy.gradient_checkpointing", True),
    (["--policy.chunk_size=10"], "policy.chunk_size", 10),
    (["--dataset.repo_id=org/data"], "dataset.repo_id", "org/data"),
    (["--dataset.root", "/data/x"], "dataset.root", ("/data/x",)),
    (["--dataset.root=[/data/x,/data/y]"], "dataset.root", ("/data/x", "/data/y")),
    (['--rename_map={"observation.images.image": "observation.images.top"}'], "dataset.rename_map",
     {"observation.images.image": "observation.images.top"}),
    (["--env.type=reach", "--env.task=red"], "env.type", "reach"),
    (["--env.task=libero_spatial"], "env.task", "libero_spatial"),
    (["--env.episode_length=300"], "env.max_steps", 300),
    (["--eval.n_episodes=5"], "env.episodes", 5),
    (["--eval_freq=2000"], "env.eval_every", 2000),
    (["--env_eval_freq=3000"], "env.eval_every", 3000),
    (["--eval_steps=250"], "eval_every", 250),
    (["--eval_steps=0"], "dataset.eval_episodes", 0),
    (["--output_dir=outputs/train/x"], "output_dir", "outputs/train/x"),
    (["--seed=7"], "seed", 7),
    (["--num_workers=6"], "dataset.num_workers", 6),
    (["--prefetch_factor=4"], "dataset.prefetch_factor", 4),
    (["--tolerance_s=0.02"], "dataset.tolerance_s", 0.02),
    (["--dataset.tolerance-s", "0.003"], "dataset.tolerance_s", 0.003),  # ours
    (["--dataset.video_backend=pyav"], "dataset.tolerance_s", 1e-4),  # accepted, nothing to set
    (["--dataset.image_transforms.enable=true"], "dataset.image_transforms.enable", True),
    (["--dataset.image_transforms.max_num_transforms=2"], "dataset.image_transforms.max_num_transforms", 2),
    (["--save_freq=500"], "checkpoint.every", 500),
    (["--save_freq=0", "--steps=1234"], "checkpoint.every", 1234),  # LeRobot: only the final checkpoint
    (["--log_freq=25"], "log_every", 25),
    (["--resume=true"], "resume", True),
    (["--resume=false"], "resume", False),
    (["--wandb.enable=false"], "log_with", ("tensorboard",)),  # accepted, nothing to set
    (["--wandb.enable=true"], "log_with", ("tensorboard", "wandb")),
    (["--ema.enable=true", "--ema.decay=0.99"], "ema.decay", 0.99),
    (["--ema.enable=false"], "ema.decay", 0.0),
    (["--dataset.episodes=[0,1,2]"], "dataset.episodes", ("0", "1", "2")),
    (["--peft.lora_alpha=null"], "peft.lora_alpha", 8),  # PEFT's default, as LeRobot's null
    (["--peft.lora_alpha=32"], "peft.lora_alpha", 32),
    (["--peft.target_modules=null"], "peft.target_modules", None),
    (["--peft.target_modules=[q_proj, v_proj]"], "peft.target_modules", ("q_proj", "v_proj")),
    (["--peft.full_training_modules=[]"], "peft.full_training_modules", ()),
    (["--peft.full_training_modules=null"], "peft.full_training_modules", ()),
    (["--peft.full_training_modules=[state_proj,action_out_proj]"], "peft.full_training_modules",
     ("state_proj", "action_out_proj")),
    (["--peft.full-training-modules", "state_proj", "action_out_proj"], "peft.full_training_modules",
     ("state_proj", "action_out_proj")),  # ours, unchanged
    (["--optim.lr", "5e-4", "--policy.no-gradient-checkpointing"], "optim.lr", 5e-4),  # ours, unchanged
    (["--resume"], "resume", True),  # ours, unchanged
    (["--resume", "auto"], "resume", "auto"),
    (["--policy.use-relative-actions", "True"], "policy.use_relative_actions", True),  # ours: bool | None
    (["--policy.use_relative_actions=false"], "policy.use_relative_actions", False),
])
def test_mapped_flag_takes_lerobots_meaning(flags, field, expected, capsys):
    value = cli(["smolvla_lora", *flags], console_outputs=False)
    for part in field.split("."):
        value = getattr(value, part)
    assert value == expected


def test_lerobot_schedule_without_decay_steps_says_how_it_differs(capsys):
    cfg = cli(["smolvla_lora", "--optim.decay_steps=None", "--policy.optimizer_lr=1e-3", "--steps=1000"])
    assert cfg.optim.decay_steps is None and cfg.optim.warmup_steps == 1000
    assert "LeRobot's SmolVLA preset decays over 30000 steps" in capsys.readouterr().out


def test_lerobot_schedule_shrinks_warmup_and_decay_for_a_shorter_run(capsys):
    cfg = cli(["smolvla_lora", "--policy.scheduler_decay_steps=30000", "--policy.scheduler_warmup_steps=1000",
               "--steps=3000"])
    assert (cfg.optim.warmup_steps, cfg.optim.decay_steps) == (100, 3000)  # int(1000 * 3000 / 30000), as LeRobot
    assert "warmup 1000 -> 100, decay 30000 -> 3000" in capsys.readouterr().out
    cfg = cli(["smolvla_lora", "--policy.scheduler_decay_steps=30000", "--steps=40000"])
    assert (cfg.optim.warmup_steps, cfg.optim.decay_steps) == (1000, 30000)  # longer run: decay then hold


@pytest.mark.parametrize("flag, message", [
    ("--job_name=libero", "--job_name (lerobot-train) has no equivalent: runs are not named here"),
    ("--policy.device=cuda", "the device comes from Accelerate"),
    ("--policy.type=smolvla", "give its folder or Hub id with --policy.path"),
    ("--wandb.project=lerobot", "--wandb.project (lerobot-train) has no equivalent: the wandb project is named "
                                "after the run folder (--output_dir)"),
    ("--wandb.entity=me", "set the WANDB_ENTITY environment variable"),
    ("--wandb.notes=hello", "its other settings come from WANDB_* environment variables"),
    ("--ema.enable=true", "give a constant --ema.decay (e.g. 0.999)"),
    ("--ema.power=0.75", "the EMA here has a constant decay: --ema.decay"),
    ("--save_checkpoint=false", "checkpoints are always saved"),
    ("--optimizer.lr=1e-4", "use --policy.optimizer_* / --policy.scheduler_* (or --optim.*)"),
    ("--scheduler.num_warmup_steps=10", "use --policy.optimizer_* / --policy.scheduler_* (or --optim.*)"),
    ("--use_policy_training_preset=false", "the optimizer is always AdamW"),
    ("--dataset.eval_split=0.1", "hold out the last N episodes with --dataset.eval_episodes N"),
    ("--dataset.video_backend=ffmpeg", "expected one of LeRobot's torchcodec, pyav, video_reader"),
    ("--dataset.image_transforms.random_order=true", "augmentation is set by --dataset.image_transforms.enable"),
    ("--policy.freeze_vision_encoder=false", "the policy folder's config.json (--policy.path) holds it"),
    ("--policy.input_features={\"a\": 1}", "features always come from the dataset here"),
    ("--env.fps=30", "--env.fps (lerobot-train) has no equivalent: the simulator wrappers"),
    ("--job.target=a10g-small", "training runs where it is launched"),
    ("--save_checkpoint_to_hub=true", "only the last checkpoint is pushed"),
    ("--cudnn_deterministic=true", "--cudnn_deterministic (lerobot-train) has no equivalent"),
    ("--policy.push_to_hub=true", "--policy.push_to_hub=true needs --policy.repo_id"),
    ("--resume=maybe", "--resume=maybe: expected true or false"),
    ("--policy.gradient_checkpointing=maybe", "--policy.gradient_checkpointing=maybe: expected true or false"),
    ("--foo.bar=1", "unknown flag --foo.bar: neither an option of this suite (see --help) nor a lerobot-train flag"),
])
def test_refused_lerobot_flag_names_what_to_use(flag, message, capsys):
    assert message in refused(["smolvla_lora", flag], capsys)


# --- --config_path: a LeRobot train_config.json -----------------------------------------------------------------------

def lerobot_train_config(**changes) -> dict:
    """A train_config.json as LeRobot (0.4 field names) writes it into checkpoints/<step>/pretrained_model/."""
    config = {
        "dataset": {"repo_id": "HuggingFaceVLA/libero", "root": None, "episodes": None,
                    "image_transforms": {"enable": False, "max_num_transforms": 3, "random_order": False, "tfs": {}},
                    "revision": None, "use_imagenet_stats": True, "video_backend": "torchcodec", "streaming": False},
        "env": {"type": "libero", "task": "libero_spatial", "fps": 30, "features": {}, "features_map": {},
                "episode_length": 520, "obs_type": "pixels_agent_pos", "render_mode": "rgb_array",
                "camera_name": "agentview_image,robot0_eye_in_hand_image", "init_states": True},
        "policy": {"type": "smolvla", "n_obs_steps": 1,
                   "input_features": {"observation.state": {"type": "STATE", "shape": [8]}},
                   "output_features": {"action": {"type": "ACTION", "shape": [7]}},
                   "device": "cuda", "use_amp": False, "use_peft": True, "push_to_hub": True,
                   "repo_id": "me/my_libero_smolvla", "private": None, "tags": None, "license": None,
                   "pretrained_path": "lerobot/smolvla_base", "chunk_size": 50, "n_action_steps": 50, "num_steps": 10,
                   "freeze_vision_encoder": True, "optimizer_lr": 0.001, "optimizer_betas": [0.9, 0.95],
                   "optimizer_eps": 1e-08, "optimizer_weight_decay": 1e-10, "optimizer_grad_clip_norm": 10.0,
                   "scheduler_warmup_steps": 1000, "scheduler_decay_steps": 30000, "scheduler_decay_lr": 0.0001,
                   "vlm_model_name": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"},
        "output_dir": "outputs/train/libero_smolvla", "job_name": "libero_smolvla", "resume": False, "seed": 1000,
        "num_workers": 4, "batch_size": 32, "steps": 100000, "eval_freq": 20000, "log_freq": 200,
        "save_checkpoint": True, "save_freq": 20000, "use_policy_training_preset": True,
        "optimizer": {"type": "adamw", "lr": 0.001, "weight_decay": 1e-10, "grad_clip_norm": 10.0,
                      "betas": [0.9, 0.95], "eps": 1e-08},
        "scheduler": {"type": "cosine_decay_with_warmup", "num_warmup_steps": 1000, "num_decay_steps": 30000,
                      "peak_lr": 0.001, "decay_lr": 0.0001},
        "eval": {"n_episodes": 50, "batch_size": 50, "use_async_envs": False},
        "wandb": {"enable": False, "disable_artifact": False, "project": "lerobot", "entity": None, "notes": None,
                  "run_id": None, "mode": None},
        "peft": {"target_modules": None, "full_training_modules": ["state_proj"], "method_type": "LORA",
                 "init_type": None, "r": 32, "lora_alpha": 64},
        "rename_map": {"observation.images.image": "observation.images.top"},
    }
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            config[section][leaf] = value
        else:
            config[section] = value
    return config


def write_config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "pretrained_model" / "train_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lerobot_train_config(**changes), indent=4))
    return path


def test_config_path_loads_a_lerobot_training_config(tmp_path, capsys):
    path = write_config(tmp_path)
    cfg = cli(["smolvla_lora", f"--config_path={path}", "--policy.push_to_hub=false"])
    assert cfg.policy.path == "lerobot/smolvla_base" and cfg.policy.repo_id is None  # push_to_hub=false wins
    assert cfg.dataset.repo_id == "HuggingFaceVLA/libero"
    assert cfg.dataset.rename_map == {"observation.images.image": "observation.images.top"}
    assert (cfg.peft.method, cfg.peft.r, cfg.peft.lora_alpha) == ("LORA", 32, 64)
    assert cfg.peft.full_training_modules == ("state_proj",) and cfg.peft.target_modules is None
    o = cfg.optim
    assert (o.lr, o.betas, o.decay_lr, o.warmup_steps, o.decay_steps) == (1e-3, (0.9, 0.95), 1e-4, 1000, 30000)
    assert (cfg.steps, cfg.batch_size, cfg.seed, cfg.log_every, cfg.checkpoint.every) == (100000, 32, 1000, 200, 20000)
    assert cfg.dataset.num_workers == 4 and cfg.output_dir == "outputs/train/libero_smolvla"
    assert cfg.dataset.image_transforms.enable is False
    assert (cfg.env.type, cfg.env.task, cfg.env.max_steps, cfg.env.episodes, cfg.env.eval_every) == (
        "libero", "libero_spatial", 520, 50, 20000)
    out = capsys.readouterr().out
    assert "config policy.optimizer_lr=0.001 -> --optim.lr=0.001" in out
    assert "not used here" in out and "dataset.video_backend" in out and "wandb.project" in out


def test_config_path_reads_lerobot_06_field_names(tmp_path, capsys):
    config = lerobot_train_config()
    del config["eval_freq"]
    config.update(env_eval_freq=5000, eval_steps=0, prefetch_factor=4, persistent_workers=True, reward_model=None,
                  save_checkpoint_to_hub=False, sample_weighting=None, job={"target": None, "tags": []},
                  ema={"enable": False, "decay": None, "update_after_step": 0, "power": 0.75})
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(config))
    cfg = cli(["smolvla_lora", f"--config_path={path}", "--policy.push_to_hub=false"])
    assert (cfg.env.eval_every, cfg.dataset.eval_episodes, cfg.dataset.prefetch_factor, cfg.ema.decay) == (
        5000, 0, 4, 0.0)  # eval_steps 0: no held-out split, as LeRobot's default
    assert "persistent_workers" in capsys.readouterr().out  # listed as not used


def test_command_line_overrides_the_config_file_and_picks_the_preset(tmp_path, capsys):
    path = write_config(tmp_path)
    cfg = cli([f"--config_path={path}", "--steps=3000", "--peft.r=8", "--env.type=null", "--batch_size=4",
               "--policy.repo_id=me/other"])  # no preset: the policy type's (smolvla -> smolvla_lora)
    assert (cfg.steps, cfg.peft.r, cfg.env.type, cfg.batch_size) == (3000, 8, None, 4)
    assert cfg.policy.repo_id == "me/other"
    assert (cfg.optim.warmup_steps, cfg.optim.decay_steps) == (100, 3000)  # LeRobot shortens its schedule
    assert "preset smolvla_lora (policy type smolvla)" in capsys.readouterr().out


def test_config_path_maps_lerobots_image_transforms(tmp_path, capsys):
    tfs = {"brightness": {"weight": 2.0, "type": "ColorJitter", "kwargs": {"brightness": [0.7, 1.3]}},
           "hue": {"weight": 1.0, "type": "ColorJitter", "kwargs": {"hue": [-0.1, 0.1]}},
           "affine": {"weight": 0.5, "type": "RandomAffine", "kwargs": {"degrees": [-10.0, 10.0],
                                                                        "translate": [0.1, 0.1]}}}
    path = write_config(tmp_path, dataset__image_transforms={"enable": True, "max_num_transforms": 2,
                                                             "random_order": False, "tfs": tfs})
    t = cli(["smolvla_lora", f"--config_path={path}", "--policy.push_to_hub=false"]).dataset.image_transforms
    assert (t.enable, t.max_num_transforms, t.brightness, t.hue) == (True, 2, (0.7, 1.3), (-0.1, 0.1))
    assert (t.affine_degrees, t.affine_translate) == (10.0, 0.1)
    assert t.weights == (2.0, 0.0, 0.0, 1.0, 0.0, 0.5)  # ops absent from LeRobot's tfs are never picked
    tfs["crop"] = {"weight": 1.0, "type": "RandomCrop", "kwargs": {"size": 10}}
    path = write_config(tmp_path, dataset__image_transforms={"enable": True, "tfs": tfs})
    assert "tfs ['crop'] have no equivalent" in refused(["smolvla_lora", f"--config_path={path}"], capsys)


def test_config_path_without_the_policy_preset_uses_its_optimizer_sections(tmp_path, capsys):
    path = write_config(tmp_path, use_policy_training_preset=False,
                        optimizer={"type": "adamw", "lr": 2e-4, "weight_decay": 0.01, "grad_clip_norm": 1.0,
                                   "betas": [0.9, 0.999], "eps": 1e-8},
                        scheduler={"type": "cosine_decay_with_warmup", "num_warmup_steps": 10,
                                   "num_decay_steps": 500, "peak_lr": 4e-4, "decay_lr": 4e-5})
    cfg = cli(["smolvla_lora", f"--config_path={path}", "--policy.push_to_hub=false", "--steps=1000"])
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.grad_clip_norm, o.betas, o.warmup_steps, o.decay_steps) == (
        2e-4, 0.01, 1.0, (0.9, 0.999), 10, 500)
    assert o.decay_lr == pytest.approx(2e-5)  # LambdaLR scales the optimizer's lr: 2e-4 * 4e-5 / 4e-4


@pytest.mark.parametrize("changes, message", [
    ({"sample_weighting": {"type": "rabc"}}, "sample_weighting.type = rabc changes what is trained"),
    ({"policy__pretrained_path": None}, "no policy.pretrained_path (a run from scratch)"),
    ({"use_policy_training_preset": False, "optimizer": {"type": "sgd", "lr": 0.1}}, "optimizer.type 'sgd'"),
])
def test_config_path_refuses_what_would_train_something_else(tmp_path, capsys, changes, message):
    path = write_config(tmp_path, **changes)
    assert message in refused(["smolvla_lora", f"--config_path={path}"], capsys)


def test_config_path_that_is_not_a_lerobot_config(tmp_path, capsys):
    assert "no such file" in refused(["smolvla_lora", f"--config_path={tmp_path / 'nope.json'}"], capsys)
    (tmp_path / "x.json").write_text(json.dumps({"steps": 3}))
    assert "not a LeRobot training config" in refused(["smolvla_lora", f"--config_path={tmp_path / 'x.json'}"],
                                                      capsys)


# --- --env.*: refused up front, before any model is built ----------------------------------------------------------

def test_env_without_task_is_refused_before_anything_is_built(policy_dir, dataset_root, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        train.main(["smolvla_lora", f"--policy.path={policy_dir}", f"--dataset.root={dataset_root}",
                    f"--output_dir={out}", "--env.type=reach"])
    assert "--env.type reach needs --env.task" in capsys.readouterr().err
    assert not out.exists()


def test_unavailable_simulator_is_refused_before_anything_is_built(policy_dir, dataset_root, tmp_path, capsys):
    """LIBERO's assets are never on a CI machine (and before finetune.envs exists the whole extra is missing)."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["smolvla_lora", f"--policy.path={policy_dir}", f"--dataset.root={dataset_root}",
                    f"--output_dir={out}", "--env.type=libero", "--env.task=libero_spatial"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --env.type libero") and err.count("\n") == 1, err
    assert not out.exists()


# --- --env.*: closed-loop evaluation in the simulator during training -------------------------------------------------

def test_reach_simulator_evaluates_during_and_after_training(policy_dir, dataset_root, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train.main(train_args(policy_dir, dataset_root, out, "--steps", "2", "--env.type=reach",
                                    "--env.task=red,green", "--eval.n_episodes=2", "--eval_freq=1",
                                    "--env.episode_length=6"))
    sim = [m for m in read_metrics(out / "metrics.jsonl") if "sim/success_rate" in m]
    assert [m["step"] for m in sim] == [1, 2]  # every --eval_freq and at the end
    for m in sim:
        per_task = [m["sim/red/success_rate"], m["sim/green/success_rate"]]
        assert all(r in (0.0, 0.5, 1.0) for r in per_task)  # 2 episodes per task
        assert m["sim/success_rate"] == pytest.approx(sum(per_task) / 2)
    assert summary["sim_success_rate"] == sim[-1]["sim/success_rate"]
    assert "step 2: reach red,green success rate" in capsys.readouterr().out


def test_in_memory_action_chunk_fn_gives_the_predictors_robot_unit_actions(lora_run, policy_dir, dataset_root):
    """The training hook's ActionChunkFn and finetune.inference.predict's Predictor (the checkpoint reloaded) agree."""
    from finetune.config import cli as parse
    from finetune.data import load_dataset_meta
    from finetune.envs import make_env
    from finetune.envs.during_training import make_action_chunk_fn
    from finetune.inference.predict import Predictor

    cfg = parse(train_args(policy_dir, dataset_root, lora_run, "--steps", "4", "--resume"), console_outputs=False)
    accelerator = train.make_accelerator(cfg)
    run = train.setup(cfg, accelerator)  # resumes the finished run's adapter; writes nothing
    run.model.eval()
    meta = load_dataset_meta(dataset_root)
    size = meta.features[meta.camera_keys[0]]["shape"][0]
    env = make_env("reach", "green", image_size=size)
    obs, _ = env.reset(seed=3)
    act = make_action_chunk_fn(run.accelerator.unwrap_model(run.model), run.processor, cfg.dataset.rename_map,
                               accelerator.device, seed=5)
    mine = act([obs], [env.task])[0]
    accelerator.free_memory()
    accelerator._custom_objects.clear()
    predictor = Predictor.from_checkpoint(lora_run / "checkpoints" / "last", device="cpu")
    theirs = predictor({**obs, "task": env.task}, torch.Generator().manual_seed(5))
    assert mine.shape == theirs.shape == (run.processor.config.chunk_size, 2)
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)
    assert not np.allclose(mine, 0)


def test_simulator_that_does_not_fit_the_policy_stops_after_the_first_update(policy_dir, dataset_root, tmp_path,
                                                                              capsys):
    if importlib.util.find_spec("metaworld") is None:  # not importorskip: mujoco must first see MUJOCO_GL=egl
        pytest.skip("Meta-World (the [sim] extra) is not installed")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, dataset_root, out, "--steps", "50", "--env.type=metaworld",
                              "--env.task=reach-v3"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --env.type metaworld --env.task reach-v3: the policy expects camera(s)" in err
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl") if "train/loss" in m] == [1]


def test_our_own_flags_get_no_translation_notice(capsys):
    """`--log-with none` is our flag spelled our way: parsed as no tracker, and nothing to announce."""
    cfg = cli(["smolvla_lora", "--log-with", "none", "--steps", "3"])
    assert cfg.log_with == () and cfg.steps == 3
    assert "->" not in capsys.readouterr().out
