"""Two CPU processes under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (real engines, gloo) against one process.

Every distributed run is the tiny SmolVLA LoRA fine-tune launched with `accelerate launch` and a cpu_*.yaml config:
2 processes x micro-batch 2 x 2 accumulated micro-batches, compared with one process x micro-batch 4 x 2, the same
global batch. The runs set FINETUNE_DEBUG_RANK_DUMP so each rank writes its gathered view of the adapter.

Tolerance for "matches one process": rtol 1e-5 (atol 1e-6) on losses and eval MSE, 1e-4 on adapter tensors. The runs
are the same computation in fp32 except for reduction order (two half-batch gradients all-reduced, DeepSpeed's flat
fp32 partitions); measured differences are about 1e-7 relative on losses. Real faults are orders of magnitude larger:
per-rank noise or a mean of per-rank means moves the loss by ~1e-2, a rank training alone or overlapping data by more.
Resumed runs are compared with uninterrupted ones of the same mode at rtol 1e-6 (bit-identical in practice).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import train_args
from safetensors.torch import load_file

from finetune import train
from finetune.config import ConfigError, PolicyOptions, TrainConfig
from finetune.training import distributed
from finetune.training.metrics import read_metrics
from finetune.training.run_dir import topology_changes

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "accelerate_configs"
STEPS = 4
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
LOSS_APPROX = {"rel": 1e-5, "abs": 1e-6}
ADAPTER_TOL = {"rtol": 1e-4, "atol": 1e-6}
EXPECTED = {"ddp": ("MULTI_CPU", "None"), "zero2": ("DEEPSPEED", "2"), "zero3": ("DEEPSPEED", "3")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(mode: str) -> dict[str, str]:
    env = {**os.environ, distributed.DEBUG_DUMP_ENV: "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)
    if mode == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"  # what the DESIGN notes give for CPU DDP (train.py also copes without)
    return env


def launch_cmd(mode: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"cpu_{mode}.yaml"),
            "--main_process_port", str(free_port()), str(REPO / "finetune/train.py"), *args]


def run_args(policy_dir, dataset_root, out, steps, *extra) -> list[str]:
    return train_args(policy_dir, dataset_root, out, "--steps", str(steps), "--batch-size", "2",
                      "--grad-accum-steps", "2", *extra)


def launch(mode: str, policy_dir, dataset_root, out: Path, steps: int, *extra: str) -> Path:
    proc = subprocess.run(launch_cmd(mode, *run_args(policy_dir, dataset_root, out, steps, *extra)),
                          capture_output=True, text=True, timeout=300, cwd=out.parent, env=launch_env(mode))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m}


def eval_mse(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["eval/action_mse"] for m in read_metrics(run_dir / "metrics.jsonl") if "eval/action_mse" in m}


def adapter(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / f"checkpoints/{step:06d}/adapter_model.safetensors"))


@pytest.fixture(scope="module")
def single(policy_dir, dataset_root, tmp_path_factory) -> Path:
    """One process with the whole global batch: micro-batch 4 = 2 ranks x 2."""
    out = tmp_path_factory.mktemp("single") / "run"
    train.main(train_args(policy_dir, dataset_root, out, "--steps", str(STEPS), "--batch-size", "4",
                          "--grad-accum-steps", "2"))
    return out


@pytest.fixture(scope="module")
def runs(policy_dir, dataset_root, tmp_path_factory):
    """Each mode's run of STEPS in one go, launched once per module on first use."""
    done: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in done:
            done[mode] = launch(mode, policy_dir, dataset_root, tmp_path_factory.mktemp(mode) / "run", STEPS)
        return done[mode]

    return get


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_two_processes_train_like_one_with_the_same_global_batch(mode, runs, single):
    out = runs(mode)
    ran = (out / "checkpoints/last/accelerate_config.yaml").read_text()
    kind, stage = EXPECTED[mode]
    assert "#   num_processes: 2" in ran and f"#   distributed_type: {kind}" in ran
    assert f"#   zero_stage: {stage}" in ran
    infos = [json.loads((out / f"debug/rank{r}.json").read_text()) for r in (0, 1)]
    assert [(i["rank"], i["num_processes"], i["step"]) for i in infos] == [(0, 2, STEPS), (1, 2, STEPS)]

    ranks = [load_file(str(out / f"debug/rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 26
    for key in ranks[0]:  # both ranks hold the same adapter, bit for bit
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    ours, theirs = losses(out), losses(single)
    assert sorted(ours) == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([ours[s] for s in ours]), torch.tensor([theirs[s] for s in ours]),
                               **LOSS_TOL, check_dtype=False)
    mse, ref_mse = eval_mse(out), eval_mse(single)
    assert sorted(mse) == [0, STEPS]  # held-out eval reported once per evaluation, on the same rows as one process
    for step in mse:
        assert mse[step] == pytest.approx(ref_mse[step], rel=1e-5)
    saved, ref = adapter(out), adapter(single)
    assert saved.keys() == ref.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], ref[key], **ADAPTER_TOL)
    state = json.loads((out / "checkpoints/last/trainer_state.json").read_text())
    ref_state = json.loads((single / "checkpoints/last/trainer_state.json").read_text())
    topology = {"distributed_type", "world_size", "zero_stage"}  # per run: the data position must not depend on them
    assert {k: v for k, v in state.items() if k not in topology} == \
        {k: v for k, v in ref_state.items() if k not in topology}  # 32 samples, 8 batches
    assert (state["world_size"], ref_state["world_size"]) == (2, 1)


def test_zero3_saves_the_gathered_adapter_and_it_loads_with_peft(runs, policy_dir):
    from helpers import tiny_batch
    from peft.utils import get_peft_model_state_dict

    from finetune.adapters import load_adapter
    from finetune.policies import load_policy

    out = runs("zero3")
    ckpt = out / "checkpoints/last"
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    live = load_file(str(out / "debug/rank0.safetensors"))  # rank 0's gathered live tensors after the last save
    assert saved.keys() == live.keys() and len(saved) == 26
    for key, tensor in saved.items():
        assert tensor.numel() > 0 and tensor.dim() == 2, (key, tensor.shape)  # never empty or shape [0]
        assert torch.equal(tensor, live[key]), key
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # trained, not PEFT's zero init

    reloaded = load_adapter(load_policy(policy_dir), ckpt, trainable=False).eval()
    state = get_peft_model_state_dict(reloaded)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    base = load_policy(policy_dir).eval()
    batch = tiny_batch(base)
    noise = torch.randn(3, base.config.chunk_size, 32)
    assert not torch.allclose(reloaded.predict_action_chunk(batch, noise=noise),
                              base.predict_action_chunk(batch, noise=noise))


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_stop_at_2_and_resume_to_4_matches_4_in_one_go(mode, runs, policy_dir, dataset_root, tmp_path):
    straight = runs(mode)
    out = launch(mode, policy_dir, dataset_root, tmp_path / "resumed", 2)
    state_dir = out / "checkpoints/000002/training_state"
    shards = sorted(p.name for p in (state_dir / "pytorch_model").iterdir())
    assert [n for n in shards if n.endswith("optim_states.pt")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state_bytes = sum(p.stat().st_size for p in state_dir.rglob("*.pt"))
    assert state_bytes < 0.1 * (policy_dir / "model.safetensors").stat().st_size  # the frozen base is not in it

    launch(mode, policy_dir, dataset_root, out, STEPS, "--resume")
    ours, theirs = losses(out), losses(straight)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-6, abs=1e-7), (step, ours, theirs)
    resumed, ref = adapter(out), adapter(straight)
    for key in ref:  # step 4's update depends on the restored AdamW moments
        torch.testing.assert_close(resumed[key], ref[key], rtol=1e-6, atol=1e-8)
    assert json.loads((out / "checkpoints/last/trainer_state.json").read_text())["batches_seen"] == 2 * STEPS


def test_deepspeed_config_with_cpu_flag_is_refused_not_trained_as_ddp(policy_dir, dataset_root, tmp_path):
    env = {**launch_env("zero2"), "ACCELERATE_USE_CPU": "true"}  # Accelerate would silently drop DeepSpeed
    proc = subprocess.run(launch_cmd("zero2", *run_args(policy_dir, dataset_root, tmp_path / "run", 2)),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "asks for DeepSpeed but the run came up as MULTI_CPU" in proc.stderr
    assert not (tmp_path / "run/checkpoints").exists()


def stop_rank_1_while_training(tmp_path, policy_dir, dataset_root, sig: int, **env: str) -> float:
    """Start a long DDP run, send `sig` to rank 1 once training has started; seconds until the job exits non-zero."""
    import psutil

    out = tmp_path / "run"
    args = run_args(policy_dir, dataset_root, out, 10_000, "--dataset.eval-episodes", "0",
                    "--checkpoint.every", "10000")
    proc = subprocess.Popen(launch_cmd("ddp", *args), cwd=tmp_path, env={**launch_env("ddp"), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 240
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and "train/loss" in metrics.read_text()):  # training has started
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if _rank(p) == "1"]
        assert workers, "rank 1 not found"
        os.kill(workers[0].pid, sig)
        start = time.monotonic()
        assert proc.wait(timeout=180) != 0
        return time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
        for worker in workers:  # a stopped rank left behind by a failed assertion
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


def test_a_rank_that_dies_fails_the_job_instead_of_hanging(policy_dir, dataset_root, tmp_path):
    assert stop_rank_1_while_training(tmp_path, policy_dir, dataset_root, signal.SIGKILL) < 120  # like the OOM killer


@pytest.mark.slow
def test_a_rank_that_hangs_fails_the_job_after_the_process_group_timeout(policy_dir, dataset_root, tmp_path):
    """SIGSTOP: the rank stays alive, so only the collective timeout (FINETUNE_DIST_TIMEOUT_S) ends the job."""
    took = stop_rank_1_while_training(tmp_path, policy_dir, dataset_root, signal.SIGSTOP,
                                      **{distributed.TIMEOUT_ENV: "10"})
    assert 10 <= took < 150


def _rank(process) -> str | None:
    import psutil

    try:
        return process.environ().get("RANK")
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        return None


# --- guards (no processes started): what check_distributed_support refuses ---------------------------------------


def fake_accelerator(distributed_type="NO", num_processes=1, grad_accum=1, ds_config=None, zero3_init=False):
    from accelerate.utils import DistributedType

    ds_config = {} if ds_config is None else ds_config
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    plugin = SimpleNamespace(deepspeed_config=ds_config, zero3_init_flag=zero3_init, zero_stage=stage)
    return SimpleNamespace(distributed_type=DistributedType(distributed_type), num_processes=num_processes,
                           gradient_accumulation_steps=grad_accum, device=torch.device("cpu"),
                           state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize(("env", "accelerator", "message"), [
    ({"WORLD_SIZE": "2"}, fake_accelerator(), "each rank would train alone"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, fake_accelerator("MULTI_CPU"), "ACCELERATE_USE_CPU"),
    ({}, fake_accelerator("FSDP"), "FSDP is not supported"),
    ({}, fake_accelerator(grad_accum=4), "gradient_accumulation_steps in the accelerate config"),
    ({}, fake_accelerator("DEEPSPEED", ds_config={"optimizer": {"type": "Adam"}}), "'optimizer' section"),
    ({}, fake_accelerator("DEEPSPEED", ds_config={"scheduler": {"type": "WarmupLR"}}), "'scheduler' section"),
    ({}, fake_accelerator("DEEPSPEED", ds_config={"gradient_clipping": 1.0}), "--optim.grad-clip-norm is 10.0"),
    ({}, fake_accelerator("DEEPSPEED", ds_config={"train_micro_batch_size_per_gpu": 8}), "--batch-size is 32"),
    ({}, fake_accelerator("DEEPSPEED", ds_config={"fp16": {"enabled": True}}), "fp16 under DeepSpeed"),
    ({}, fake_accelerator("DEEPSPEED", ds_config={"zero_optimization": {"stage": 3}}, zero3_init=True),
     "zero3_init_flag"),
])
def test_unworkable_combinations_are_refused_with_the_reason(env, accelerator, message, monkeypatch):
    for key in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        distributed.check_distributed_support(TrainConfig(), accelerator)


def test_compile_under_deepspeed_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    accelerator = fake_accelerator("DEEPSPEED", ds_config={"zero_optimization": {"stage": 2}})
    distributed.check_distributed_support(TrainConfig(), accelerator)
    with pytest.raises(ConfigError, match="--policy.compile is not supported under DeepSpeed"):
        distributed.check_distributed_support(TrainConfig(policy=PolicyOptions(compile=True)), accelerator)


def test_supported_deepspeed_config_passes_and_gets_the_training_config(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ds = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto", "bf16": {"enabled": True}}
    accelerator = fake_accelerator("DEEPSPEED", num_processes=1, grad_accum=2, ds_config=ds)
    cfg = TrainConfig(batch_size=3, grad_accum_steps=2)
    distributed.check_distributed_support(cfg, accelerator)
    distributed.fill_deepspeed_config(cfg, accelerator)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 6 and ds["gradient_clipping"] == cfg.optim.grad_clip_norm
    assert ds["bf16"] == {"enabled": False} and ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def test_ranks_take_disjoint_slices_of_the_one_process_batches():
    from itertools import islice

    from finetune.training.sampling import ResumableBatchSampler

    one = list(islice(iter(ResumableBatchSampler(50, 8, 1, 0, seed=3)), 12))  # 2 epochs of 6 batches
    ranks = [list(islice(iter(ResumableBatchSampler(50, 4, 2, r, seed=3)), 12)) for r in (0, 1)]
    for step, batch in enumerate(one):
        assert ranks[0][step] + ranks[1][step] == batch and not set(ranks[0][step]) & set(ranks[1][step])
    resumed = ResumableBatchSampler(50, 4, 2, 1, seed=3)
    resumed.set_position(7)
    assert list(islice(iter(resumed), 5)) == ranks[1][7:12]


def test_flow_noise_of_a_sample_does_not_depend_on_the_world_size():
    one = fake_accelerator()
    one.process_index = 0
    noise, time_ = distributed.flow_noise(7, 3, 4, one, 5, 6)
    for rank in (0, 1):
        acc = fake_accelerator(num_processes=2)
        acc.process_index = rank
        n, t = distributed.flow_noise(7, 3, 2, acc, 5, 6)
        assert torch.equal(n, noise[2 * rank : 2 * rank + 2]) and torch.equal(t, time_[2 * rank : 2 * rank + 2])
    other, _ = distributed.flow_noise(7, 4, 4, one, 5, 6)
    assert not torch.equal(other, noise)  # a new draw for each micro-batch


@pytest.mark.slow
def test_zero3_with_cpu_offload_trains_like_one_process(policy_dir, dataset_root, tmp_path, single):
    """ZeRO-3 with optimizer and parameters offloaded to CPU memory (on CPU ranks with torch's AdamW: see
    fill_deepspeed_config), trained, saved, and resumed like the others."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "zero3_offload.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(REPO / "finetune/train.py"), *run_args(policy_dir, dataset_root, out, STEPS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=launch_env("zero3"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "#   num_processes: 2" in (out / "checkpoints/last/accelerate_config.yaml").read_text()
    ours, theirs = losses(out), losses(single)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], **LOSS_APPROX), (step, ours, theirs)
    ranks = [load_file(str(out / f"debug/rank{r}.safetensors")) for r in (0, 1)]
    saved = adapter(out)
    for key, tensor in saved.items():
        assert tensor.numel() > 0 and torch.equal(tensor, ranks[0][key]) and torch.equal(tensor, ranks[1][key]), key

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, symlinks=True)
    os.unlink(resumed / "checkpoints/last")
    os.symlink("000002", resumed / "checkpoints/last")
    shutil.rmtree(resumed / "checkpoints/000004")
    cmd[cmd.index(str(out))] = str(resumed)
    proc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env=launch_env("zero3"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for key, tensor in adapter(resumed).items():
        torch.testing.assert_close(tensor, saved[key], rtol=1e-6, atol=1e-8)


# --- resuming with another number of processes ------------------------------------------------------------------


def rewind_to_step_2(run_dir: Path, into: Path) -> Path:
    """A copy of a finished 4-step run as it was when checkpoint 2 was its last one."""
    shutil.copytree(run_dir, into, symlinks=True)
    shutil.rmtree(into / "checkpoints/000004")
    os.unlink(into / "checkpoints/last")
    os.symlink("000002", into / "checkpoints/last")
    shutil.rmtree(into / "debug", ignore_errors=True)
    return into


def assert_continues_like(out: Path, reference: Path) -> None:
    ours, theirs = losses(out), losses(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], **LOSS_APPROX), (step, ours, theirs)
    saved, ref = adapter(out), adapter(reference)
    for key in ref:
        torch.testing.assert_close(saved[key], ref[key], **ADAPTER_TOL)
    assert json.loads((out / "checkpoints/last/trainer_state.json").read_text())["batches_seen"] == 2 * STEPS


@pytest.mark.slow
def test_ddp_run_resumes_on_one_process_with_the_global_batch_kept(runs, single, policy_dir, dataset_root, tmp_path,
                                                                   capsys):
    out = rewind_to_step_2(runs("ddp"), tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:  # 2 x 2 per micro-batch at save; 1 x 2 would halve it
        train.main(run_args(policy_dir, dataset_root, out, STEPS, "--resume"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "global micro-batch: 2 x 2 process(es) = 4 at save, now 2 x 1 = 2 (pass --batch-size 4 to keep" in err
    train.main(run_args(policy_dir, dataset_root, out, STEPS, "--batch-size", "4", "--resume"))
    assert json.loads((out / "checkpoints/last/trainer_state.json").read_text())["world_size"] == 1
    assert_continues_like(out, single)


@pytest.mark.slow
def test_one_process_run_resumes_on_two_ddp_ranks(single, policy_dir, dataset_root, tmp_path):
    out = rewind_to_step_2(single, tmp_path / "run")
    launch("ddp", policy_dir, dataset_root, out, STEPS, "--resume")  # micro-batch 2 per rank = 4 as saved
    assert json.loads((out / "checkpoints/last/trainer_state.json").read_text())["world_size"] == 2
    assert_continues_like(out, single)


@pytest.mark.slow
def test_zero2_checkpoint_is_not_resumed_as_ddp(runs, policy_dir, dataset_root, tmp_path, capsys):
    out = rewind_to_step_2(runs("zero2"), tmp_path / "run")
    with pytest.raises(SystemExit):
        train.main(run_args(policy_dir, dataset_root, out, STEPS, "--batch-size", "4", "--resume"))
    err = capsys.readouterr().err
    assert "topology: saved under DEEPSPEED ZeRO-2, now NO; the optimizer state is stored differently" in err


@pytest.mark.parametrize(("saved", "now", "message"), [
    ({"world_size": 2, "distributed_type": "DEEPSPEED", "zero_stage": 2}, fake_accelerator(
        "DEEPSPEED", num_processes=1, ds_config={"zero_optimization": {"stage": 2}}),
     "processes: 2 at save, now 1; the optimizer state is sharded by ZeRO over 2 ranks: resume with 2 processes"),
    ({"world_size": 1, "distributed_type": "DEEPSPEED", "zero_stage": 2}, fake_accelerator(
        "DEEPSPEED", num_processes=2, ds_config={"zero_optimization": {"stage": 3}}),
     "topology: saved under DEEPSPEED ZeRO-2, now DEEPSPEED"),
    ({"world_size": 2, "distributed_type": "MULTI_CPU", "zero_stage": None}, fake_accelerator(
        "DEEPSPEED", num_processes=2, ds_config={"zero_optimization": {"stage": 2}}),
     "topology: saved under MULTI_CPU, now DEEPSPEED"),
])
def test_resuming_a_sharded_state_on_another_topology_is_refused_up_front(saved, now, message):
    cfg = TrainConfig(batch_size=4 // now.num_processes)
    old = TrainConfig(batch_size=4 // saved["world_size"])
    changes = topology_changes(old, saved, cfg, now)
    assert any(message in c for c in changes), changes


def test_ddp_world_size_change_with_the_global_batch_kept_is_accepted():
    saved = {"world_size": 2, "distributed_type": "MULTI_CPU", "zero_stage": None}
    assert topology_changes(TrainConfig(batch_size=2), saved, TrainConfig(batch_size=4), fake_accelerator()) == []
    two = fake_accelerator("MULTI_CPU", num_processes=2)
    one_saved = {"world_size": 1, "distributed_type": "NO", "zero_stage": None}
    assert topology_changes(TrainConfig(batch_size=4), one_saved, TrainConfig(batch_size=2), two) == []
