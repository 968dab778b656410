"""Loader defaults (workers, decoder threads, pinning) and held-out batches kept as this rank's uint8 rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import train_args

from finetune import train
from finetune.data import LeRobotDataset, load_dataset_meta
from finetune.data.workers import (
    cache_bytes_per_process,
    default_decoder_threads,
    default_num_workers,
    loader_kwargs,
    resolve_num_workers,
)
from finetune.hub import load_tokenizer
from finetune.policies import load_policy
from finetune.policies.base import ACTION, ACTION_IS_PAD, OBS_STATE
from finetune.policies.processor import PolicyProcessor, images_to_float
from finetune.training.evaluation import fixed_eval_batches
from finetune.training.metrics import read_metrics

CAM = "observation.images.top"


@pytest.mark.parametrize(("cpus", "ranks", "workers", "threads"), [
    (2, 1, 1, 1),    # this dev machine, one process: one worker beside the training process
    (2, 2, 0, 1),    # two ranks on two cores: each decodes in its own process
    (1, 1, 0, 1),
    (16, 1, 8, 1),   # capped at 8 workers; 9 processes on 16 cores -> 1 decoder thread each
    (16, 2, 7, 1),
    (32, 4, 7, 1),
    (96, 8, 8, 1),
])
def test_default_workers_and_threads_fit_the_cores(cpus, ranks, workers, threads):
    assert default_num_workers(cpus, ranks) == workers
    assert default_decoder_threads(cpus, ranks, workers) == threads
    assert ranks * (workers + 1) <= max(cpus, ranks)  # never more loading processes than cores


def test_explicit_workers_win_and_decoding_in_process_gets_threads():
    assert resolve_num_workers(0, 1, cpus=64) == 0 and resolve_num_workers(3, 8, cpus=2) == 3
    assert resolve_num_workers(None, 2, cpus=16) == 7
    with pytest.raises(ValueError, match="num-workers must be >= 0"):
        resolve_num_workers(-1, 1)
    assert default_decoder_threads(16, 1, 0) == 2 and default_decoder_threads(2, 2, 0) == 1


@pytest.mark.parametrize(("budget_mb", "ranks", "workers", "memory_gib", "per_process_mib"), [
    (None, 8, 8, 1024, 4096 // 64),  # 1 TiB node: 4 GiB in all (the cap) over 8 ranks x 8 workers
    (None, 1, 1, 23, 23 * 1024 // 32),  # this dev machine: 1/32 of its memory, for its one worker
    (None, 8, 0, 64, 64 * 1024 // 32 // 8),  # no workers: each rank decodes in its own process
    (2048, 4, 7, 512, 2048 // 28),  # a given budget is the node's, whatever its memory
    (0, 2, 3, 64, 0),
])
def test_decode_cache_is_one_budget_per_node(budget_mb, ranks, workers, memory_gib, per_process_mib):
    per_process = cache_bytes_per_process(budget_mb, ranks, workers, node_memory=memory_gib << 30)
    assert per_process >> 20 == per_process_mib
    assert per_process * ranks * max(1, workers) <= (budget_mb << 20 if budget_mb is not None else 4 << 30)


def test_loader_kwargs():
    assert loader_kwargs(0, torch.device("cpu")) == {"num_workers": 0, "pin_memory": False}
    assert loader_kwargs(3, torch.device("cuda", 1), 4) == {"num_workers": 3, "pin_memory": True,
                                                            "persistent_workers": True, "prefetch_factor": 4}


def test_eval_batches_hold_only_this_ranks_rows_as_uint8(policy_dir, dataset_root):
    policy = load_policy(policy_dir)
    meta = load_dataset_meta(dataset_root)
    processor = PolicyProcessor(policy.config, load_tokenizer(policy_dir, None, policy.config.tokenizer_name),
                                meta.stats)
    keys = [CAM, OBS_STATE, ACTION]
    as_uint8 = LeRobotDataset(dataset_root, 5, episodes=[8, 9], keys=keys, uint8_images=True)
    as_float = LeRobotDataset(dataset_root, 5, episodes=[8, 9], keys=keys)
    reference = fixed_eval_batches(as_float, processor, 5, 2)  # one process: all rows, float
    ranks = [fixed_eval_batches(as_uint8, processor, 5, 2, SimpleNamespace(process_index=r, num_processes=2))
             for r in range(2)]
    for b, ref in enumerate(reference):
        assert ref.size == 5 and ref.rows == list(range(5))
        assert [ranks[r][b].rows for r in range(2)] == [[0, 2, 4], [1, 3]]
        for r in range(2):
            held = ranks[r][b]
            assert held.size == 5 and len(held.batch[OBS_STATE]) == len(held.rows)  # only this rank's rows
            assert held.batch[CAM].dtype == torch.uint8
            floats = images_to_float(dict(held.batch))[CAM]
            torch.testing.assert_close(floats, ref.batch[CAM][held.rows], rtol=0, atol=0)
            torch.testing.assert_close(held.batch[ACTION], ref.batch[ACTION][held.rows], rtol=0, atol=0)


def test_held_out_mse_matches_a_float_reference(lora_run, policy_dir, dataset_root):
    """The run's step-0 figure (the untrained adapter is the identity) recomputed here from float frames, by the
    metric's definition: masked squared error of normalized actions, noise from a generator seeded 0."""
    logged = [m["eval/action_mse"] for m in read_metrics(lora_run / "metrics.jsonl")
              if "eval/action_mse" in m and m["step"] == 0]
    policy = load_policy(policy_dir).eval()
    meta = load_dataset_meta(dataset_root)
    processor = PolicyProcessor(policy.config, load_tokenizer(policy_dir, None, policy.config.tokenizer_name),
                                meta.stats)
    cfg = policy.config
    ds = LeRobotDataset(dataset_root, cfg.chunk_size, episodes=[8, 9], keys=[CAM, OBS_STATE, ACTION])
    indices = torch.linspace(0, len(ds) - 1, 4).round().long().tolist()  # train_args: batch 4, 1 eval batch
    batch = processor([ds[i] for i in indices])
    noise = torch.randn(4, cfg.chunk_size, cfg.max_action_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = policy.predict_action_chunk(batch, noise=noise)
    valid = (~batch[ACTION_IS_PAD]).unsqueeze(-1).float()
    expected = float((((pred - batch[ACTION]) ** 2) * valid).sum() / (valid.sum() * pred.shape[-1]))
    assert logged == [pytest.approx(expected, rel=1e-5)]


def test_training_resolves_its_loader_defaults(policy_dir, dataset_root, tmp_path, monkeypatch):
    monkeypatch.setattr("finetune.data.workers.available_cpus", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # as if a second rank shared the two cores
    summary = train.main(train_args(policy_dir, dataset_root, tmp_path / "two", "--steps", "1",
                                    "--dataset.eval-episodes", "0"))
    assert (summary["data_workers"], summary["decoder_threads"]) == (0, 1)
    assert summary["video_cache_mb_per_process"] == cache_bytes_per_process(None, 2, 0) >> 20
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    summary = train.main(train_args(policy_dir, dataset_root, tmp_path / "one", "--steps", "1",
                                    "--dataset.eval-episodes", "0", "--dataset.decoder-threads", "2",
                                    "--dataset.video-cache-mb", "300"))
    assert (summary["data_workers"], summary["decoder_threads"], summary["video_cache_mb_per_process"]) == (1, 2, 300)


def test_stop_workers_ends_persistent_workers_that_ignore_sigterm():
    """Training workers ignore SIGTERM (the group's signal is the training process's); stop_workers ends them at
    once, so nothing is left for the interpreter's exit to wait on (its terminate() would be ignored)."""
    import multiprocessing

    from finetune.data.workers import stop_workers
    from finetune.training.preemption import ignore_stop_signals

    before = set(multiprocessing.active_children())
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, **loader_kwargs(
        2, torch.device("cpu"), worker_init_fn=ignore_stop_signals))
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    alive = [p for p in multiprocessing.active_children() if p not in before and p.is_alive()]
    assert len(alive) == 2  # persistent: they outlive the pass
    alive[0].terminate()  # what the interpreter's exit would send: ignored
    alive[0].join(timeout=1)
    assert alive[0].is_alive()
    stop_workers(loader)
    for p in alive:
        p.join(timeout=10)
    assert not [p for p in alive if p.is_alive()]
