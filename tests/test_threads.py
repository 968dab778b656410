"""Intra-op CPU threads of a training run (--cpu-threads; finetune/training/threads.py)."""

from __future__ import annotations

from helpers import train_args

from finetune import train


def test_cpu_threads_one_for_small_models_torchs_count_for_big_ones_and_the_flag_wins(monkeypatch):
    from finetune.training.threads import SMALL_MODEL_PARAMS, choose_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_cpu_threads(None, 3_000_000, 2)[0] == 1
    assert choose_cpu_threads(None, 450_000_000, 2) == (2, "torch's default, one per core")
    assert choose_cpu_threads(None, SMALL_MODEL_PARAMS - 1, 1)[0] == 1
    assert choose_cpu_threads(4, 3_000_000, 2) == (4, "--cpu-threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # accelerate launch always sets it: a small model still gets one
    assert choose_cpu_threads(None, 3_000_000, 2)[0] == 1
    assert choose_cpu_threads(None, 450_000_000, 2) == (2, "OMP_NUM_THREADS")


def test_a_run_uses_its_cpu_threads_and_gives_the_callers_back(policy_dir, dataset_root, tmp_path, capsys,
                                                               monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # a caller with two threads (an earlier test may have left one)
    before = torch.get_num_threads()
    summary = train.main(train_args(policy_dir, dataset_root, tmp_path / "a", "--steps", "1"))
    assert summary["cpu_threads"] == 1 and torch.get_num_threads() == before
    assert "cpu threads: 1 (a small model" in capsys.readouterr().out
    summary = train.main(train_args(policy_dir, dataset_root, tmp_path / "b", "--steps", "1", "--cpu-threads", "3"))
    assert summary["cpu_threads"] == 3 and torch.get_num_threads() == before
    torch.set_num_threads(previous)
