"""Intra-op CPU threads for the training process (--cpu-threads).

A small model's step is thousands of short parallel regions; with two or more threads each region ends at a barrier,
and when anything else wants the cores (the run's own data-loader worker, a neighbour's job, a second run) a thread
descheduled for a time slice stalls every region: the demo's LoRA phase fell from 8-10 to 0.25-0.4 updates/s on a
loaded 2-core machine. One thread has no barrier to wait at and degrades only by its share of the CPU. A real-size
model's regions are long enough for more threads to pay (about 1.8x per step on 2 cores), so it keeps torch's count.
Waiting threads keep spinning (OMP_WAIT_POLICY unset): PASSIVE made the demo's idle step 3x slower.
bench/contention.py measures both sides.
"""

from __future__ import annotations

import os

import torch

SMALL_MODEL_PARAMS = 50_000_000  # below this a step's parallel regions are too short for threads to pay under load


def choose_cpu_threads(requested: int | None, n_params: int, torch_default: int) -> tuple[int, str]:
    """(threads, why) for a model of `n_params` parameters. OMP_NUM_THREADS does not decide for small models:
    `accelerate launch` always sets it (to the cores per process), so it says nothing about the model."""
    if requested is not None:
        return requested, "--cpu-threads"
    if n_params < SMALL_MODEL_PARAMS and torch_default > 1:
        return 1, f"a small model ({n_params / 1e6:.1f}M parameters) keeps its speed on a shared CPU with one"
    source = "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else "torch's default, one per core"
    return torch_default, source


def apply_cpu_threads(requested: int | None, n_params: int, on_cpu: bool) -> tuple[int, str] | None:
    """Set torch's intra-op threads for training on CPU; returns (threads, why), or None when the model is not on
    the CPU (a GPU run's CPU threads only feed it)."""
    if not on_cpu:
        return None
    threads, why = choose_cpu_threads(requested, n_params, torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads, why
