"""Training speed on a shared CPU: the demo's LoRA phase alone and beside a CPU hog, per thread policy.

    .venv/bin/python bench/contention.py                        # project vs torch's default, idle/busy/twin, 2 rounds
    .venv/bin/python bench/contention.py --arms torch passive one-thread project --rounds 1 --steps 40

Each row trains the demo's LoRA fine-tune (tiny SmolVLA, batch 32, LoRA r 16; finetune/demo.py's FINETUNE recipe)
from a random tiny base for `--steps` updates in a fresh process, and reports updates per second: the median of the
logged intervals after the first (warm-up) one. `busy` runs the same beside one spinning process per core (a
neighbour's single-threaded job); `twin` beside a second copy of the same training with torch's default threads
(a second demo, a colleague's run), whose OpenMP threads spin-wait too. The arms differ only in their environment,
set before torch loads:

- `torch`: torch's own defaults (as many intra-op threads as cores, `--cpu-threads` set to that; OpenMP threads
  spin while waiting);
- `passive`: torch's thread count with OMP_WAIT_POLICY=PASSIVE (waiting threads sleep);
- `one-thread`: a single intra-op thread;
- `project`: the project's default (finetune/training/threads.py: one thread for models under 50M parameters).

Arms and loads are interleaved round by round, so a drift in the machine touches every row alike. The table gives
each arm's speed per load and its ratio to idle, the figure the thread policy is for (issue 22: within 3x).
The real-size step, the other side of the trade, is untouched by construction: models of 50M parameters and more
keep torch's thread count (`bench/step.py` times it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CORES = str(os.cpu_count() or 1)
THREADS_ENV = "BENCH_CPU_THREADS"  # the worker's --cpu-threads ("" for the project's default)
ARMS = {
    "torch": {THREADS_ENV: CORES},
    "passive": {THREADS_ENV: CORES, "OMP_WAIT_POLICY": "PASSIVE"},
    "one-thread": {THREADS_ENV: "1"},
    "project": {},
}
LOADS = ("idle", "busy", "twin")
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", THREADS_ENV)


def make_assets(folder: Path) -> tuple[Path, Path]:
    """The demo's fine-tuning dataset and a randomly initialized tiny base (its speed is the pretrained one's)."""
    from finetune.data import load_dataset_meta, make_synthetic_dataset
    from finetune.demo import IMAGE_SIZE, DemoConfig, make_initial_policy

    demo = DemoConfig()
    dataset, policy = folder / "dataset", folder / "policy"
    if not (dataset / "meta" / "info.json").is_file():
        make_synthetic_dataset(dataset, num_episodes=demo.finetune_episodes, target_colors=list(demo.finetune_colors),
                               seed=2, image_size=IMAGE_SIZE, action_sign=demo.finetune_action_sign)
    if not (policy / "model.safetensors").is_file():
        make_initial_policy(policy, load_dataset_meta(dataset), seed=0)
    return policy, dataset


def worker(policy: str, dataset: str, out: str, steps: int) -> None:
    """One timed run of the demo's LoRA recipe (in a fresh process, so the arm's environment applies)."""
    from dataclasses import replace

    from finetune import train
    from finetune.config import CheckpointOptions
    from finetune.demo import FINETUNE

    cfg = replace(FINETUNE, policy=replace(FINETUNE.policy, path=policy),
                  dataset=replace(FINETUNE.dataset, root=dataset, eval_episodes=0),
                  checkpoint=CheckpointOptions(every=10**6, keep_last=1), output_dir=out, steps=steps, log_every=5,
                  eval_every=10**6, log_with=("none",), log_level="warning",
                  cpu_threads=int(os.environ[THREADS_ENV]) if os.environ.get(THREADS_ENV) else None)
    train.run(cfg)


def updates_per_s(metrics: Path, batch_size: int) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [r["train/samples_per_s"] / batch_size for r in rows if "train/samples_per_s" in r][1:]
    return statistics.median(rates)


def start_load(load: str, policy: Path, dataset: Path, tmp: str) -> list[subprocess.Popen]:
    if load == "busy":
        return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(int(CORES))]
    if load == "twin":
        env = {**{k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}, **ARMS["torch"]}
        twin = subprocess.Popen([sys.executable, __file__, "--worker", str(policy), str(dataset), f"{tmp}/twin",
                                 "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(15)  # until it trains
        return [twin]
    return []


def timed_run(arm: str, load: str, policy: Path, dataset: Path, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(ARMS[arm])
    with tempfile.TemporaryDirectory() as tmp:
        neighbours = start_load(load, policy, dataset, tmp)
        try:
            out = Path(tmp) / "run"
            subprocess.run([sys.executable, __file__, "--worker", str(policy), str(dataset), str(out), str(steps)],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            from finetune.demo import FINETUNE

            return updates_per_s(out / "metrics.jsonl", FINETUNE.batch_size)
        finally:
            for process in neighbours:
                process.kill()
                process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=["torch", "project"], choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=40, help="updates per run (logged every 5)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (the median is reported)")
    parser.add_argument("--loads", nargs="+", default=list(LOADS), choices=LOADS)
    parser.add_argument("--assets", default=str(REPO / "runs" / "bench_contention"))
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker[:3], int(args.worker[3]))
        return
    policy, dataset = make_assets(Path(args.assets))
    speeds: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        for load in args.loads:
            for arm in args.arms:
                started = time.perf_counter()
                speed = timed_run(arm, load, policy, dataset, args.steps)
                speeds.setdefault((arm, load), []).append(speed)
                print(f"round {round_ + 1} {arm:<10} {load}: {speed:.2f} updates/s "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"\n{os.cpu_count()} cores, {cpu}; demo LoRA phase (batch 32), median of {args.rounds} rounds")
    loads = [load for load in LOADS if load in args.loads]
    print("| arm | " + " | ".join(f"{load} updates/s" for load in loads) + " | " +
          " | ".join(f"{load} / idle" for load in loads if load != "idle") + f" | idle vs {args.arms[0]} |")
    print("|---" * (2 * len(loads)) + "|---|")
    base_idle = statistics.median(speeds.get((args.arms[0], "idle"), [float("nan")]))
    for arm in args.arms:
        rate = {load: statistics.median(speeds[(arm, load)]) for load in loads}
        ratios = [f"{rate[load] / rate['idle']:.2f}" for load in loads if load != "idle" and "idle" in rate]
        print(f"| {arm} | " + " | ".join(f"{rate[load]:.2f}" for load in loads) + " | " + " | ".join(ratios) +
              f" | {rate.get('idle', float('nan')) / base_idle:.2f}x |")


if __name__ == "__main__":
    main()
