"""launch.sh --dry-run on one node, on plain multi-node variables and under SLURM; the shipped accelerate configs."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch.sh"
CONFIGS = REPO / "accelerate_configs"
TRAIN = str(REPO / "finetune/train.py")
BASE_ENV = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}  # no scheduler, no GPU unless a test says so


def dry_run(*args: str, cwd: Path = REPO, **env: str) -> tuple[list[str], dict[str, str]]:
    """The command launch.sh would exec, split, and the accelerate options in it."""
    proc = subprocess.run(["bash", str(LAUNCH), "--dry-run", *args], capture_output=True, text=True, timeout=30,
                          env={**BASE_ENV, **env}, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert cmd[1] == "launch" and Path(cmd[0]).name == "accelerate"
    split = cmd.index(TRAIN)
    parsed = launch_command_parser().parse_args([*cmd[2:split], TRAIN])  # every option is a real accelerate one
    options = {k: str(v) for k, v in vars(parsed).items() if v is not None and v is not False and v != []}
    return cmd, options


def fails(*args: str, **env: str) -> str:
    proc = subprocess.run(["bash", str(LAUNCH), "--dry-run", *args], capture_output=True, text=True, timeout=30,
                          env={**BASE_ENV, **env}, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout)
    return proc.stderr


def test_single_node_without_gpu_runs_the_cpu_config_and_passes_arguments_through(tmp_path):
    cmd, opts = dry_run("smolvla_lora", "--steps", "3", "--output-dir", "runs/a b", cwd=tmp_path)
    assert opts["config_file"] == str(CONFIGS / "cpu.yaml")
    assert "num_processes" not in opts and "num_machines" not in opts and "main_process_ip" not in opts
    assert cmd[cmd.index(TRAIN) + 1 :] == ["smolvla_lora", "--steps", "3", "--output-dir", "runs/a b"]


def test_single_node_uses_all_local_gpus():
    _, opts = dry_run("smolvla_lora", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert opts["config_file"] == str(CONFIGS / "ddp.yaml")
    assert (opts["num_processes"], opts["num_machines"], opts["machine_rank"]) == ("4", "1", "0")
    assert "main_process_ip" not in opts
    _, opts = dry_run("smolvla_lora", GPUS_PER_NODE="1")
    assert opts["config_file"] == str(CONFIGS / "single_gpu.yaml") and "num_processes" not in opts


def test_plain_multi_node_variables():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29411", "GPUS_PER_NODE": "8"}
    cmd, opts = dry_run("--config", "zero3", "smolvla_lora", "--resume", **env)
    assert opts["config_file"] == str(CONFIGS / "zero3.yaml")
    assert (opts["num_processes"], opts["num_machines"], opts["machine_rank"]) == ("16", "2", "1")
    assert (opts["main_process_ip"], opts["main_process_port"]) == ("10.1.2.3", "29411")
    assert opts["deepspeed_multinode_launcher"] == "standard"  # torchrun on each node, no pdsh/ssh
    assert cmd[-2:] == ["smolvla_lora", "--resume"]


def test_slurm_environment():
    if shutil.which("scontrol", path=BASE_ENV["PATH"]):
        pytest.skip("a real scontrol would resolve the fake node list")
    slurm = {"SLURM_JOB_NUM_NODES": "3", "SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "4",
             "SLURM_JOB_NODELIST": "gpu-[07-08,11]"}
    _, opts = dry_run("--config", "accelerate_configs/multinode_zero3.yaml", "smolvla_lora", **slurm)
    assert opts["config_file"] == str(CONFIGS / "multinode_zero3.yaml")
    assert (opts["num_processes"], opts["num_machines"], opts["machine_rank"]) == ("12", "3", "2")
    assert (opts["main_process_ip"], opts["main_process_port"]) == ("gpu-07", "29500")
    _, opts = dry_run("smolvla_lora", **{**slurm, "SLURM_JOB_NODELIST": "nodeA,nodeB,nodeC"})
    assert opts["main_process_ip"] == "nodeA" and opts["config_file"] == str(CONFIGS / "ddp.yaml")
    _, opts = dry_run("smolvla_lora", **{**slurm, "MASTER_ADDR": "10.0.0.9", "NODE_RANK": "0"})  # plain ones win
    assert (opts["main_process_ip"], opts["machine_rank"]) == ("10.0.0.9", "0")


def test_inconsistent_setups_are_refused_with_the_reason():
    assert "NODE_RANK 2 is out of range for NNODES 2" in fails(
        "x", NNODES="2", NODE_RANK="2", MASTER_ADDR="h", GPUS_PER_NODE="8")
    assert "MASTER_ADDR is not set" in fails("x", NNODES="2", NODE_RANK="0", GPUS_PER_NODE="8")
    assert "accelerate config 'nope.yaml' does not exist" in fails("--config", "nope.yaml", "x")
    assert "NNODES must be a positive integer" in fails("x", NNODES="two")
    assert "no GPU was found" in fails("x", NNODES="2", MASTER_ADDR="h")
    assert "runs one process" in fails("--config", "cpu", "x", NNODES="2", MASTER_ADDR="h", GPUS_PER_NODE="8")


def test_slurm_example_goes_through_launch_sh():
    text = (REPO / "examples/slurm_multinode.sbatch").read_text()
    assert "#SBATCH --nodes=" in text and "--ntasks-per-node=1" in text and "./launch.sh" in text
    assert subprocess.run(["bash", "-n", str(REPO / "examples/slurm_multinode.sbatch")]).returncode == 0


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_what_it_is_for(path):
    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    header = path.read_text().split("\ncompute_environment")[0]
    assert header.startswith("# ") and "Cost" in header, "the header says what it is for and what it costs"
    ds = raw.get("deepspeed_config", {})
    if config.distributed_type.value == "DEEPSPEED":
        assert ds["zero3_init_flag"] is False  # the policy is built whole, then sharded by prepare()
        for key in ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu"):
            assert key not in ds, f"{key} comes from the training config"
    if path.name.startswith("cpu"):
        assert config.mixed_precision == "no"  # fp32: runs compare exactly with one process
        assert config.num_processes == (1 if path.name == "cpu.yaml" else 2)
    else:
        assert config.mixed_precision == "bf16"
    expected_stage = {"zero1.yaml": 1, "zero2.yaml": 2, "cpu_zero2.yaml": 2, "zero3.yaml": 3, "cpu_zero3.yaml": 3,
                      "zero3_offload.yaml": 3, "multinode_zero3.yaml": 3}
    assert ds.get("zero_stage") == expected_stage.get(path.name)
    if path.name == "zero3_offload.yaml":
        assert ds["offload_optimizer_device"] == "cpu" and ds["offload_param_device"] == "cpu"
    if path.name == "multinode_zero3.yaml":
        assert ds["deepspeed_multinode_launcher"] == "standard" and config.num_machines > 1


# --- two nodes on one machine: launch.sh once per "node", each in its own working directory ----------------------


def launch_two_nodes(tmp_path: Path, output_dir: str, policy_dir: Path, dataset_root: Path) -> list:
    import socket
    import sys

    from helpers import train_args

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "NNODES": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "GPUS_PER_NODE": "1", "FINETUNE_DIST_TIMEOUT_S": "120"}
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        args = train_args(policy_dir, dataset_root, Path(output_dir), "--steps", "2")
        procs.append(subprocess.Popen(["bash", str(LAUNCH), "--config", "cpu_ddp", *args], cwd=cwd,
                                      env={**env, "NODE_RANK": str(node)}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return [(p.returncode, *p.communicate(timeout=400)) if p.wait(timeout=400) is not None else None for p in procs]


@pytest.mark.slow
def test_two_nodes_without_a_shared_output_dir_are_refused_at_start(tmp_path, policy_dir, dataset_root):
    """A relative --output-dir resolved in each node's own working directory: two folders, as without a shared
    filesystem. Both nodes stop before training with the reason."""
    results = launch_two_nodes(tmp_path, "run", policy_dir, dataset_root)
    for node, (code, stdout, stderr) in enumerate(results):
        assert code == 2, (node, stderr[-3000:])
        assert stderr.count("error: --output-dir run is not shared by all processes: rank 1 on ") == 1, stderr
        assert "Multi-node runs need an --output-dir on a filesystem every node mounts" in stderr
    for node in (0, 1):
        assert not (tmp_path / f"node{node}/run/checkpoints").exists()


@pytest.mark.slow
def test_two_nodes_with_a_shared_output_dir_train_and_only_the_main_node_reports_files(tmp_path, policy_dir,
                                                                                     dataset_root):
    out = tmp_path / "shared_run"
    (code0, out0, err0), (code1, out1, err1) = launch_two_nodes(tmp_path, str(out), policy_dir, dataset_root)
    assert code0 == 0 and code1 == 0, (err0[-3000:], err1[-3000:])
    assert "#   num_processes: 2" in (out / "checkpoints/000002/accelerate_config.yaml").read_text()
    assert f"checkpoint: {out / 'checkpoints/000002'}" in out0 and "trained weights:" in out0
    assert out1 == ""  # node 1 wrote no file the user needs: it prints nothing about files (or anything else)
    assert not list(out.glob(".shared-check-*"))
