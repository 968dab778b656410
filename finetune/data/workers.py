"""DataLoader settings for a training process: worker and decoder-thread counts from the machine, and the rest."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MAX_DEFAULT_WORKERS = 8  # beyond this a rank's loader rarely gets faster
# Default decoded-frame cache for a whole node: this share of its memory, at most DEFAULT_CACHE_CAP. On random access
# over a dataset larger than the cache, a cache hits rarely (docs/benchmarks.md): memory is better left to the rest.
DEFAULT_CACHE_SHARE = 1 / 32
DEFAULT_CACHE_CAP = 4 << 30


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask, which containers and SLURM restrict), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_world_size(default: int = 1) -> int:
    """Training processes on this machine: torchrun's (and so accelerate launch's) LOCAL_WORLD_SIZE, else `default`."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", default))


def default_num_workers(cpus: int, local_ranks: int) -> int:
    """Workers per rank: the rank's share of the cores less one for the training process itself, at most 8.

    2 cores, 1 rank -> 1; 2 cores, 2 ranks -> 0 (decode in the training process); 32 cores, 4 ranks -> 7.
    """
    return max(0, min(MAX_DEFAULT_WORKERS, cpus // max(1, local_ranks) - 1))


def default_decoder_threads(cpus: int, local_ranks: int, workers: int) -> int:
    """Video decoder threads per loading process, so that the ranks' training processes, their workers and the
    decoders' threads together stay within the cores: 1 as soon as workers share them.

    Each process decodes a frame or two per sample after a seek; more threads than that helps little, so at most 2.
    """
    processes = max(1, local_ranks) * (workers + 1 if workers else 1)
    return max(1, min(2, cpus // processes))


def node_memory_bytes() -> int:
    """Memory this machine gives us: its RAM, or the cgroup's limit (containers, SLURM) when lower."""
    import psutil

    total = psutil.virtual_memory().total
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # cgroup v2; "max" when unlimited
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def cache_bytes_per_process(node_budget_mb: int | None, local_ranks: int, workers: int,
                            node_memory: int | None = None) -> int:
    """Each training loader process's share of the node's decoded-frame cache: the budget (None: DEFAULT_CACHE_SHARE
    of the node's memory, at most DEFAULT_CACHE_CAP) split across ranks x workers (x 1 when a rank decodes in its own
    process). 8 ranks with 8 workers each on a 1 TiB node: 4 GiB in all, 64 MiB per worker. The held-out batches,
    decoded once, use no cache."""
    if node_budget_mb is None:
        budget = min(int((node_memory or node_memory_bytes()) * DEFAULT_CACHE_SHARE), DEFAULT_CACHE_CAP)
    elif node_budget_mb < 0:
        raise ValueError(f"--dataset.video-cache-mb must be >= 0, got {node_budget_mb}")
    else:
        budget = node_budget_mb << 20
    return budget // (max(1, local_ranks) * max(1, workers))


def resolve_num_workers(requested: int | None, local_ranks: int, cpus: int | None = None) -> int:
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--dataset.num-workers must be >= 0, got {requested}")
        return requested
    return default_num_workers(cpus or available_cpus(), local_ranks)


def loader_kwargs(workers: int, device: torch.device, prefetch_factor: int = 2,
                  worker_init_fn: Callable[[int], None] | None = None) -> dict[str, Any]:
    """DataLoader keywords: persistent, prefetching workers when there are any (each started with `worker_init_fn`);
    pinned memory when feeding CUDA."""
    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor)
        if worker_init_fn is not None:
            kwargs["worker_init_fn"] = worker_init_fn
    return kwargs


def stop_workers(loader: torch.utils.data.DataLoader) -> None:
    """Stop a loader's persistent workers now, as the loader does when it is collected. Training workers ignore
    SIGTERM (finetune.training.preemption.ignore_stop_signals), so one left for the interpreter's exit, where
    multiprocessing terminates its children with SIGTERM and waits for them, would hang that exit. Uses the
    DataLoader's private iterator (torch has no public call for it); tests/test_loading.py fails if that changes."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None
