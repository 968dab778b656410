"""LIBERO env speed: steps per second of finetune's LiberoEnv (two cameras rendered each step) per image size, and the
reset time (model rebuild, init state, 10 settle steps). Needs hf-libero and the assets (README, Simulators).

    LIBERO_CONFIG_PATH=... /work/libero-venv/bin/python bench/libero_steps.py [--steps 60] [--sizes 128 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from finetune.envs import make_env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="libero_spatial:0")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--assets-dir")
    args = parser.parse_args()
    actions = np.random.default_rng(0).uniform(-0.3, 0.3, (args.steps, 7)).astype(np.float32)
    rows = []
    for size in args.sizes:
        env = make_env("libero", args.task, image_size=size, assets_dir=args.assets_dir)
        start = time.perf_counter()
        env.reset(seed=0)
        reset_s = time.perf_counter() - start
        start = time.perf_counter()
        for action in actions:
            env.step(action)
        rows.append((size, args.steps / (time.perf_counter() - start), reset_s))
        env.close()
    print(f"{'image':>6} {'steps/s':>8} {'reset s':>8}   ({args.task}, 2 cameras, {args.steps} steps)")
    for size, rate, reset_s in rows:
        print(f"{size:>6} {rate:>8.1f} {reset_s:>8.1f}")
    print(f"ratio 256 px to {args.sizes[0]} px: {rows[-1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
