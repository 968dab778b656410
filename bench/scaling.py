"""Training throughput with 1 and 2 processes on the same machine: samples/s and the ratio to 1 process.

    .venv/bin/python bench/scaling.py [--steps 20] [--batch-size 8] [--modes ddp zero2 zero3]

Runs the tiny SmolVLA LoRA fine-tune (built here, offline) through `accelerate launch`: once with one process
(accelerate_configs/cpu.yaml, or single_gpu.yaml with a GPU) and once per mode with 2 processes (cpu_<mode>.yaml),
each process with the same micro-batch (weak scaling: 2 processes train twice the global batch per step). On CPU the
cores are split evenly: one process gets all threads, two get half each; one more row runs one process on 1 thread.
Throughput is the median of the logged per-step samples/s after the first `--warmup` steps. Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "accelerate_configs"
sys.path.insert(0, str(REPO))


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_assets(folder: Path) -> tuple[Path, Path]:
    from finetune.data import load_dataset_meta, make_synthetic_dataset
    from finetune.demo import make_initial_policy

    data = folder / "data"
    if not data.exists():
        make_synthetic_dataset(data, num_episodes=24, target_colors=["red", "green"], episode_length=32, seed=0,
                               episodes_per_file=8)
    policy = folder / "policy"
    if not policy.exists():
        make_initial_policy(policy, load_dataset_meta(data), seed=0)
    return policy, data


def run(config: str, processes: int, threads: int, policy: Path, data: Path, out: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", str(processes), "--main_process_port", str(free_port()),
           str(REPO / "finetune/train.py"), "smolvla_lora", "--policy.path", str(policy), "--dataset.root", str(data),
           "--output-dir", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--peft.r", "8", "--optim.warmup-steps", "2", "--log-every", "1", "--dataset.eval-episodes", "0",
           "--checkpoint.every", str(10 * args.steps), "--seed", "0"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
    from finetune.training.metrics import read_metrics

    ran = (out / "checkpoints/last/accelerate_config.yaml").read_text()
    assert f"#   num_processes: {processes}" in ran, ran  # the run really had that many ranks
    rates = [m["train/samples_per_s"] for m in read_metrics(out / "metrics.jsonl") if "train/samples_per_s" in m]
    return {"samples_per_s": statistics.median(rates[args.warmup :]), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch per process")
    parser.add_argument("--modes", nargs="+", default=["ddp"], choices=["ddp", "zero2", "zero3"])
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every config this many times, interleaved, and report the median (noisy machines)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep assets and runs here (default: a temp dir)")
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        policy, data = make_assets(work / "assets")
        rows = [("1 process", "single_gpu.yaml" if gpu else "cpu.yaml", 1, cores)]
        if not gpu and cores > 1:  # the same process on one core: separates thread scaling from process scaling
            rows.append(("1 process, 1 thread", "cpu.yaml", 1, 1))
        rows += [(f"2 processes, {mode}", f"cpu_{mode}.yaml", 2, max(1, cores // 2)) for mode in args.modes]
        measured: list[list[dict]] = [[] for _ in rows]
        for _ in range(args.repeats):
            for i, (_, config, processes, threads) in enumerate(rows):
                out = work / f"run{i}-{time.time_ns()}"
                measured[i].append(run(config, processes, threads, policy, data, out, args))
        results = [(*row, {key: statistics.median(m[key] for m in runs) for key in runs[0]})
                   for row, runs in zip(rows, measured, strict=True)]

    device = torch.cuda.get_device_name(0) if gpu else f"CPU, {cores} cores ({cpu_name()})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntiny SmolVLA LoRA, micro-batch {args.batch_size} per process, {args.steps} steps "
          f"(median after {args.warmup}), median of {args.repeats} run(s); {device}; torch {torch.__version__}; "
          f"load average at the end {load:.1f}\n")
    print(f"| {'run':<22} | {'config':<16} | threads/proc | samples/s | vs 1 process | wall s |")
    print(f"|{'-' * 24}|{'-' * 18}|--------------|-----------|--------------|--------|")
    base = results[0][4]["samples_per_s"]
    for name, config, _, threads, r in results:
        print(f"| {name:<22} | {config:<16} | {threads:>12} | {r['samples_per_s']:>9.1f} | "
              f"{r['samples_per_s'] / base:>11.2f}x | {r['wall_s']:>6.1f} |")


if __name__ == "__main__":
    main()
