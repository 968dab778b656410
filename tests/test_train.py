"""The training script end to end on a tiny SmolVLA: checkpoints, resume, logs. Resuming and reloading the saved
adapter are tested for every policy type in test_policy_types.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import losses, train_args
from safetensors.torch import load_file

from finetune import train
from finetune.policies.processor import load_stats
from finetune.training.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def four_steps(straight_run) -> Path:
    """The straight 4-step LoRA run of the tiny SmolVLA (its run folder)."""
    return straight_run("smolvla")[0]


def test_checkpoint_holds_only_the_adapter_and_what_resume_needs(four_steps, policy_dir):
    ckpts = four_steps / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["000002", "000004", "last"]
    assert os.readlink(ckpts / "last") == "000004"
    last = ckpts / "000004"
    assert {p.name for p in last.iterdir()} == {
        "adapter_model.safetensors", "adapter_config.json", "config.json", "normalization_stats.safetensors",
        "train_config.json", "accelerate_config.yaml", "trainer_state.json", "training_state", "README.md",
        # LeRobot's processor files (stats, tokenizer name): its PEFT loading reads them beside the adapter
        "policy_preprocessor.json", "policy_preprocessor_step_5_normalizer_processor.safetensors",
        "policy_postprocessor.json", "policy_postprocessor_step_0_unnormalizer_processor.safetensors"}
    adapter = load_file(str(last / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter), sorted(adapter)[:5]
    assert len(adapter) == 2 * 13  # A and B for 8 expert q/v projections and 5 heads
    base_keys = load_file(str(policy_dir / "model.safetensors")).keys()
    assert not any(k in base_keys for k in adapter)
    state_files = {p.name for p in (last / "training_state").iterdir()}
    assert "optimizer.safetensors" in state_files and not any("model" in n for n in state_files)  # no base copy
    assert not [n for n in state_files if n.endswith((".bin", ".pkl", ".pt"))]  # nothing pickled
    size = (last / "adapter_model.safetensors").stat().st_size
    assert size < 0.1 * (policy_dir / "model.safetensors").stat().st_size
    assert json.loads((last / "trainer_state.json").read_text()) == {
        "step": 4, "samples_seen": 16, "batches_seen": 4, "world_size": 1, "distributed_type": "NO", "zero_stage": None}
    assert json.loads((last / "config.json").read_text())["type"] == "smolvla"
    assert json.loads((last / "train_config.json").read_text())["steps"] == 4
    assert set(load_stats(last)) >= {"observation.state", "action"}


def test_metrics_and_tensorboard_are_written(four_steps):
    metrics = read_metrics(four_steps / "metrics.jsonl")
    train_rows = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train_rows] == [1, 2, 3, 4]
    assert all(m["train/samples_per_s"] > 0 and m["train/lr"] > 0 for m in train_rows)
    evals = [m for m in metrics if "eval/action_mse" in m]
    assert [m["step"] for m in evals] == [0, 4] and all(m["eval/action_mse"] > 0 for m in evals)
    assert any(p.name.startswith("events.out.tfevents") for p in (four_steps / "tensorboard").iterdir())
    assert json.loads((four_steps / "train_config.json").read_text())["peft"]["r"] == 4


def test_keep_last_prunes_old_checkpoints(policy_dir, dataset_root, tmp_path):
    out = tmp_path / "prune"
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "3", "--checkpoint.every", "1",
                          "--checkpoint.keep-last", "2", "--dataset.eval-episodes", "0"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002", "000003", "last"]


def test_gradient_accumulation_and_checkpointing_run(policy_dir, dataset_root, tmp_path):
    out = tmp_path / "accum"
    summary = train.main(train_args(policy_dir, dataset_root, out, "--steps", "2", "--grad-accum-steps", "2",
                                    "--policy.gradient-checkpointing", "--dataset.eval-episodes", "0"))
    state = json.loads((out / "checkpoints/last/trainer_state.json").read_text())
    assert (state["step"], state["samples_seen"], state["batches_seen"]) == (2, 16, 4)
    adapter = load_file(str(out / "checkpoints/last/adapter_model.safetensors"))
    assert summary["trainable_params"] == sum(t.numel() for t in adapter.values()) > 0


def test_accelerate_launch_runs_the_script(policy_dir, dataset_root, tmp_path):
    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs/cpu.yaml"), str(REPO / "finetune/train.py"),
           *train_args(policy_dir, dataset_root, out, "--steps", "2")]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DS_ACCELERATOR")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters: trainable" in proc.stdout
    # no notices a user cannot act on (bitsandbytes' optional kernels, Accelerate's thread default, DeepSpeed's
    # accelerator detection): only our own lines and the progress bar
    for notice in ("gemm_4bit_forward", "num_cpu_threads_per_process", "Setting accelerator to CPU", "WARNING"):
        assert notice not in proc.stdout + proc.stderr, notice
    assert (out / "checkpoints/000002/adapter_model.safetensors").is_file()
    assert "distributed_type: NO" in (out / "checkpoints/000002/accelerate_config.yaml").read_text()


# --- one run per folder, --resume auto, what resume checks, metrics after a resume ----------------------------------


def test_a_new_run_into_a_used_folder_is_refused_and_leaves_it_untouched(four_steps, policy_dir, dataset_root,
                                                                         tmp_path, capsys):
    out = tmp_path / "used"
    shutil.copytree(four_steps, out, symlinks=True)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, dataset_root, out, "--steps", "2"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output-dir {out} is not empty (checkpoints/, metrics.jsonl")
    for choice in ("--resume (or --resume auto)", "a new --output-dir", "--overwrite"):
        assert choice in err, choice
    assert (out / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002", "000004", "last"]


def test_overwrite_moves_the_old_run_aside_and_starts_clean(four_steps, policy_dir, dataset_root, tmp_path, capsys):
    out = tmp_path / "runs" / "x"
    shutil.copytree(four_steps, out, symlinks=True)
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "2", "--checkpoint.every", "1", "--overwrite"))
    aside = [p for p in out.parent.iterdir() if p.name.startswith("x.old-")]
    assert len(aside) == 1 and f"moved to {aside[0]}" in capsys.readouterr().out
    assert (aside[0] / "metrics.jsonl").read_text() == (four_steps / "metrics.jsonl").read_text()  # kept whole
    assert sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == ["000002", "000004", "last"]
    assert sorted(losses(out)) == [1, 2]  # the new run's rows only
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000001", "000002", "last"]


def test_the_demo_folder_starts_over_and_says_so(tmp_path, capsys, monkeypatch):
    from finetune import demo

    out = tmp_path / "demo"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    old_previous = tmp_path / "demo.previous"
    old_previous.mkdir()
    seen = []
    monkeypatch.setattr(demo, "prepare_assets", lambda cfg: (tmp_path / "base", tmp_path / "data"))
    monkeypatch.setattr(train, "run", lambda cfg: seen.append((cfg.output_dir, sorted(p.name for p in out.iterdir())))
                        or {})
    demo.main(["--train.output-dir", str(out), "--rollout-episodes", "0"])
    assert seen == [(str(out), [".lock"])]  # the fine-tune started in an empty folder the demo holds
    said = capsys.readouterr().out
    assert f"demo: starting over in {out}; the previous run there was moved to {old_previous}" in said
    assert "replacing the older" in said
    assert [p.name for p in out.iterdir()] == [".lock"]  # the previous run moved out whole
    assert (old_previous / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resume_auto_starts_fresh_resumes_and_stops_at_steps(four_steps, policy_dir, dataset_root, tmp_path, capsys):
    out = tmp_path / "auto"
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "2", "--resume", "auto"))
    assert "--resume auto: no checkpoint in" in capsys.readouterr().out
    finished = train.main(train_args(policy_dir, dataset_root, out, "--steps", "2", "--resume", "auto"))
    assert finished == {"checkpoint": str(out / "checkpoints/000002"), "step": 2, "finished": True}
    assert "already reached step 2 (--steps 2): nothing to train" in capsys.readouterr().out
    assert sorted(losses(out)) == [1, 2]  # nothing retrained, nothing logged twice
    strict = train.main(train_args(policy_dir, dataset_root, out, "--steps", "2", "--resume"))
    assert strict["finished"] is True
    # steps, logging and checkpoint intervals may change on resume; the trajectory does not
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "4", "--resume", "auto", "--log-every", "2",
                          "--checkpoint.every", "1", "--checkpoint.keep-last", "5"))
    straight, resumed = losses(four_steps), losses(out)
    assert sorted(resumed) == [1, 2, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002", "000003", "000004", "last"]


def test_resume_refuses_every_change_that_shapes_training(four_steps, policy_dir, dataset_root, tmp_path, capsys):
    out = tmp_path / "changed"
    shutil.copytree(four_steps, out, symlinks=True)
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, dataset_root, out, "--steps", "6", "--resume", "--seed", "8",
                              "--grad-accum-steps", "2", "--peft.r", "8", "--optim.lr", "1e-4", "--batch-size", "2",
                              "--dataset.eval-episodes", "3"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for change in ("--seed: 7 -> 8", "--grad-accum-steps: 1 -> 2", "--peft.r: 4 -> 8", "--optim.lr: 0.001 -> 0.0001",
                   "--dataset.eval-episodes: 2 -> 3", "global micro-batch: 4 x 1 process(es) = 4 at save, now 2 x 1"):
        assert change in err, (change, err)
    assert "--steps" not in err
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_metrics_continue_from_the_checkpoint_without_duplicate_rows(four_steps, policy_dir, dataset_root, tmp_path):
    """A run killed after logging step 4 but before checkpointing it: the resumed run logs steps 3 and 4 once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "crashed"
    shutil.copytree(four_steps, out, symlinks=True)
    shutil.rmtree(out / "checkpoints/000004")
    os.unlink(out / "checkpoints/last")
    os.symlink("000002", out / "checkpoints/last")
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "4", "--resume"))
    rows = read_metrics(out / "metrics.jsonl")
    assert [(m["step"], "eval/action_mse" in m) for m in rows] == [
        (0, True), (1, False), (2, False), (3, False), (4, False), (4, True)]
    assert [m["step"] for m in rows if "train/loss" in m] == [1, 2, 3, 4]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/action_mse")] == [0, 4]
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    for step, value in losses(four_steps).items():
        assert tb[step] == pytest.approx(value, rel=1e-6)


# --- non-finite training -------------------------------------------------------------------------------------------

# lr 1e30: step 1's update is finite but throws the adapter to ~1e29, so step 2's loss and gradients are not.
EXPLODE = ("--optim.lr", "1e30", "--optim.decay-lr", "1e29", "--checkpoint.every", "1", "--checkpoint.keep-last", "5",
           "--dataset.eval-episodes", "0")


def test_a_non_finite_step_stops_the_run_naming_it_and_keeps_the_last_good_checkpoint(policy_dir, dataset_root,
                                                                                      tmp_path, capsys):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, dataset_root, out, "--steps", "4", *EXPLODE))
    assert exit_info.value.code == train.EXIT_NONFINITE == 3
    err = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("error: "))
    assert err.startswith("error: step 2: non-finite training (loss nan, gradient norm nan); the update was not "
                          f"applied, and the last good checkpoint {out / 'checkpoints/000001'} is kept."), err
    assert "--nonfinite skip" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000001", "last"]
    assert os.readlink(out / "checkpoints/last") == "000001"
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoints/000001/adapter_model.safetensors"))
               .values())
    assert sorted(losses(out)) == [1]


def test_nonfinite_skip_drops_those_updates_and_trains_on(policy_dir, dataset_root, tmp_path, capsys):
    out = tmp_path / "skip"
    summary = train.main(train_args(policy_dir, dataset_root, out, "--steps", "4", *EXPLODE, "--nonfinite", "skip"))
    assert summary["skipped_updates"] == 3
    assert "skipped updates (non-finite loss/gradient): 3" in capsys.readouterr().out
    rows = [m for m in read_metrics(out / "metrics.jsonl") if "train/lr" in m]
    assert [m.get("train/skipped_updates", 0) for m in rows] == [0, 1, 2, 3]
    assert [("train/loss" in m) for m in rows] == [True, False, False, False]  # NaN losses are not written
    first, last = (load_file(str(out / f"checkpoints/{s:06d}/adapter_model.safetensors")) for s in (1, 4))
    for key in first:  # no update after step 1 reached the weights
        assert torch.equal(first[key], last[key]), key
    state = json.loads((out / "checkpoints/last/trainer_state.json").read_text())
    assert (state["step"], state["batches_seen"]) == (4, 4)  # the data moved on


# --- experiment trackers ---------------------------------------------------------------------------------------------


def test_log_with_none_writes_only_metrics_jsonl(policy_dir, dataset_root, tmp_path):
    out = tmp_path / "quiet"
    train.main(train_args(policy_dir, dataset_root, out, "--steps", "1", "--log-with", "none",
                          "--dataset.eval-episodes", "0"))
    assert sorted(losses(out)) == [1]
    assert not (out / "tensorboard").exists()


def test_wandb_runs_offline_when_the_machine_is_and_needs_a_login_otherwise(monkeypatch, tmp_path):
    from finetune.config import ConfigError
    from finetune.training.metrics import _configure_wandb

    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _configure_wandb()
    assert os.environ["WANDB_MODE"] == "offline"  # logs locally, `wandb sync` later
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ConfigError, match="--log-with wandb: not logged in .*WANDB_MODE=offline"):
        _configure_wandb()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    _configure_wandb()  # logged in: online
    assert "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "netrc").unlink()
    _configure_wandb()  # the user's own mode is respected
    assert os.environ["WANDB_MODE"] == "disabled"


def test_resume_auto_restarts_a_run_that_died_before_its_first_checkpoint(policy_dir, dataset_root, tmp_path, capsys):
    from finetune.config import cli, to_dict

    out = tmp_path / "early"
    args = train_args(policy_dir, dataset_root, out, "--steps", "2")
    out.mkdir()  # what a run leaves when it dies during its first steps: its config and a few metric rows
    (out / "train_config.json").write_text(json.dumps(to_dict(cli(args))))
    (out / "metrics.jsonl").write_text('{"step": 0, "eval/action_mse": 9.0}\n{"step": 1, "train/loss": 9.0}\n')
    train.main([*args, "--resume", "auto"])
    assert "holds the same run stopped before its first checkpoint; starting it again from step 0" in \
        capsys.readouterr().out
    rows = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in rows if "train/loss" in m] == [1, 2] and all(m.get("train/loss") != 9.0 for m in rows)

    other = tmp_path / "other"
    other.mkdir()
    (other / "train_config.json").write_text(json.dumps(to_dict(cli([*args[:-1], "3", "--seed", "1"]))))
    with pytest.raises(SystemExit) as exit_info:  # leftovers of a different run: not ours to drop
        train.main(train_args(policy_dir, dataset_root, other, "--steps", "2", "--resume", "auto"))
    assert exit_info.value.code == 2 and f"--output-dir {other} is not empty" in capsys.readouterr().err


def test_runs_in_one_process_each_get_their_own_precision(policy_dir, dataset_root, tmp_path):
    """Accelerate keeps one process-wide state; a second run (a notebook, these tests) with another precision must
    neither be refused nor inherit the first run's autocast."""
    from finetune.config import cli

    bf16 = train.make_accelerator(cli(train_args(policy_dir, dataset_root, tmp_path / "a", "--policy.dtype",
                                                 "bfloat16")))
    assert bf16.mixed_precision == "bf16"
    fp32 = train.make_accelerator(cli(train_args(policy_dir, dataset_root, tmp_path / "b")))
    assert fp32.mixed_precision == "no"
    again = train.make_accelerator(cli(train_args(policy_dir, dataset_root, tmp_path / "c", "--mixed-precision",
                                                  "bf16")))
    assert again.mixed_precision == "bf16"
    assert train.make_accelerator(cli(train_args(policy_dir, dataset_root, tmp_path / "d"))).mixed_precision == "no"


def test_the_summary_says_which_way_the_error_moved():
    from finetune.train import change_ratio

    assert change_ratio(1.8588, 1.8770) == "1.0% higher"  # was "1.0x lower"
    assert change_ratio(2.0, 0.5) == "4.0x lower" and change_ratio(0.5, 2.0) == "4.0x higher"
    assert change_ratio(1.0, 0.97) == "3.0% lower" and change_ratio(1.0, 1.0) == "unchanged"


def test_progress_in_a_log_file_is_plain_lines_not_bar_frames(policy_dir, dataset_root, tmp_path, capsys):
    """stderr is not a terminal here (as in a SLURM log): no carriage-return frames, one line per interval and at
    the end, with step, loss, throughput and ETA."""
    train.main(train_args(policy_dir, dataset_root, tmp_path / "a", "--steps", "6", "--progress-every-s", "1000"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train step")]
    assert "\r" not in err and len(lines) == 1, lines
    assert lines[0].startswith("train step 6/6 (100%) loss ") and " steps/s eta 0:00:00" in lines[0]
    train.main(train_args(policy_dir, dataset_root, tmp_path / "b", "--steps", "6", "--progress-every-s", "1e-6"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train step")]
    assert [line.split()[2] for line in lines] == [f"{s}/6" for s in range(1, 7)]


@pytest.mark.parametrize("extra, joint", [((), "sdpa"), (("--mixed-precision", "bf16"), "eager"),
                                          (("--mixed-precision", "bf16", "--policy.attn-implementation", "sdpa"),
                                           "sdpa")])
def test_auto_attention_is_eager_in_the_joint_layers_under_bf16_on_cpu(policy_dir, dataset_root, tmp_path, extra,
                                                                       joint):
    """auto: SDPA, but the joint layers of a CPU run under bf16 autocast take eager (its backward is faster there);
    the vision tower keeps SDPA; an explicit choice is kept."""
    from helpers import set_up_run

    run = set_up_run(train_args(policy_dir, dataset_root, tmp_path / "run", *extra))
    joint_layers = [m for m in run.model.modules() if hasattr(m, "attn_implementation")]
    assert joint_layers and {m.attn_implementation for m in joint_layers} == {joint}
    vision = {m.config._attn_implementation for m in run.model.modules()
              if "Vision" in type(m).__name__ and hasattr(m, "config")}
    assert vision == {"sdpa"}


@pytest.mark.slow
def test_compiled_policy_trains_like_the_eager_one(policy_dir, dataset_root, tmp_path):
    """--policy.compile (inductor; minutes of compiling on 2 cores, hence slow): the same losses as the eager run,
    the same adapter keys."""
    eager = tmp_path / "eager"
    train.main(train_args(policy_dir, dataset_root, eager, "--steps", "3", "--log-every", "1"))
    compiled = tmp_path / "compiled"
    from torch._dynamo.utils import counters  # test-only: proof that graphs were compiled

    counters.clear()
    train.main(train_args(policy_dir, dataset_root, compiled, "--steps", "3", "--log-every", "1",
                          "--policy.compile"))
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    ours, ref = losses(compiled), losses(eager)
    assert ours.keys() == ref.keys() and len(ref) == 3
    for step, loss in ref.items():
        assert abs(ours[step] - loss) < 1e-4 * max(1.0, abs(loss)), (step, ours[step], loss)
    keys = load_file(str(compiled / "checkpoints" / "last" / "adapter_model.safetensors")).keys()
    assert keys == load_file(str(eager / "checkpoints" / "last" / "adapter_model.safetensors")).keys()
