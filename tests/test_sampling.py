"""Batch order (deterministic, sharded, resumable, O(batch) per batch) and loading a 100k+-frame dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from finetune.data import LeRobotDataset
from finetune.training import sampling
from finetune.training.sampling import ResumableBatchSampler, epoch_permutation

EPISODES, LENGTH, FILES, DIM = 2400, 50, 3, 6  # 120,000 frames, 800 episodes per data file


def write_state_action_dataset(root: Path, episodes: int, length: int, files: int, dim: int) -> Path:
    """A LeRobotDataset v3.0 with state and action only (no cameras): meta/ and data/ parquet files.

    Rows of each file are written in shuffled order, as nothing in the format promises sorted rows.
    """
    rng = np.random.default_rng(0)
    per_file = -(-episodes // files)
    episode_rows = []
    for f in range(files):
        eps = np.arange(f * per_file, min((f + 1) * per_file, episodes))
        ep_col = np.repeat(eps, length)
        frame = np.tile(np.arange(length), len(eps))
        index = ep_col * length + frame
        # state = global index in every dim, so the test can tell each row's origin
        state = np.repeat(index[:, None].astype(np.float32), dim, 1)
        shuffle = rng.permutation(len(index))
        table = pa.table({
            "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state[shuffle].ravel()), dim),
            "action": pa.FixedSizeListArray.from_arrays(pa.array(-state[shuffle].ravel()), dim),
            "timestamp": pa.array((frame[shuffle] / 30).astype(np.float32)),
            "frame_index": pa.array(frame[shuffle]),
            "episode_index": pa.array(ep_col[shuffle]),
            "index": pa.array(index[shuffle]),
            "task_index": pa.array(np.zeros(len(index), np.int64)),
        })
        path = root / f"data/chunk-000/file-{f:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        episode_rows += [{"episode_index": int(e), "length": length, "data/chunk_index": 0, "data/file_index": f,
                          "dataset_from_index": int(e) * length, "dataset_to_index": (int(e) + 1) * length}
                         for e in eps]
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": [0], "task": ["hold still"]}), root / "meta/tasks.parquet")
    vector = {"dtype": "float32", "shape": [dim], "names": None}
    info = {"codebase_version": "v3.0", "fps": 30, "total_episodes": episodes, "total_frames": episodes * length,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet", "video_path": None,
            "features": {"observation.state": vector, "action": vector}}
    (root / "meta/info.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory) -> Path:
    return write_state_action_dataset(tmp_path_factory.mktemp("big") / "ds", EPISODES, LENGTH, FILES, DIM)


def test_large_dataset_loads_sorted_and_indexes(big_dataset, monkeypatch):
    reads = []
    original = pq.read_table

    def counting_read(path, *args, **kwargs):
        reads.append(Path(path).relative_to(big_dataset).as_posix())
        return original(path, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", counting_read)
    ds = LeRobotDataset(big_dataset, chunk_size=10)
    assert len(ds) == EPISODES * LENGTH
    # every data file is read once
    assert sorted(r for r in reads if r.startswith("data/")) == [f"data/chunk-000/file-{f:03d}.parquet"
                                                                 for f in range(FILES)]
    # rows come back sorted by global index whatever the file order
    np.testing.assert_array_equal(ds._global_index, np.arange(EPISODES * LENGTH))
    sampler = ResumableBatchSampler(len(ds), batch_size=64, world_size=2, rank=1, seed=3)
    it = iter(sampler)
    for _ in range(200):
        batch = next(it)
        items = [ds[i] for i in batch]
        for i, item in zip(batch, items):
            assert item["index"] == i and item["observation.state"][0] == i
            e, f = divmod(i, LENGTH)
            assert (item["episode_index"], item["frame_index"]) == (e, f)
            steps = np.minimum(np.arange(10) + f, LENGTH - 1) + e * LENGTH  # chunk clamps at the episode's end
            np.testing.assert_array_equal(item["action"][:, 0].numpy(), -steps.astype(np.float32))
            assert item["action_is_pad"].tolist() == (np.arange(10) + f > LENGTH - 1).tolist()


def test_episode_subset_of_large_dataset(big_dataset):
    picked = [5, 799, 800, 2399]  # both sides of a file boundary, and the last episode
    ds = LeRobotDataset(big_dataset, chunk_size=2, episodes=picked)
    assert len(ds) == len(picked) * LENGTH
    assert [ds[k * LENGTH]["index"] for k in range(len(picked))] == [e * LENGTH for e in picked]


def test_sampler_draws_each_epoch_once_and_covers_it(monkeypatch):
    calls = []
    original = sampling.epoch_permutation
    monkeypatch.setattr(sampling, "epoch_permutation", lambda *a: calls.append(a) or original(*a))
    n, batch, world = 1003, 10, 2
    ranks = [ResumableBatchSampler(n, batch, world, r, seed=5) for r in range(world)]
    per_epoch = n // (batch * world)
    iters = [iter(s) for s in ranks]
    epochs = [[torch.tensor([next(i) for _ in range(per_epoch)]).flatten() for i in iters] for _ in range(2)]
    assert len(calls) == 2 * world  # one permutation per epoch and rank, not one per batch
    for e, (a, b) in enumerate(epochs):
        both = torch.cat([a, b])
        assert len(set(both.tolist())) == per_epoch * batch * world  # ranks disjoint, no index twice in an epoch
        # the global order is epoch_permutation's: each global batch is rank 0's slice then rank 1's
        expected = epoch_permutation(n, 5, e)[: per_epoch * batch * world].view(per_epoch, world, batch)
        torch.testing.assert_close(a.view(per_epoch, batch), expected[:, 0])
        torch.testing.assert_close(b.view(per_epoch, batch), expected[:, 1])


def test_sampler_resumes_at_any_position():
    full = ResumableBatchSampler(100, 7, 1, 0, seed=9)
    it = iter(full)
    reference = [next(it) for _ in range(40)]  # crosses 2 epoch boundaries (14 batches per epoch)
    for position in (0, 13, 14, 27, 33):
        resumed = ResumableBatchSampler(100, 7, 1, 0, seed=9)
        resumed.set_position(position)
        it = iter(resumed)
        assert [next(it) for _ in range(40 - position)] == reference[position:]
    other_seed = iter(ResumableBatchSampler(100, 7, 1, 0, seed=10))
    assert [next(other_seed) for _ in range(3)] != reference[:3]


def test_sampler_refuses_a_split_smaller_than_a_global_batch():
    with pytest.raises(ValueError, match=r"12 frames, fewer than one global batch \(4 x 4 processes\)"):
        ResumableBatchSampler(12, 4, 4, 0)



def test_no_seed_and_epoch_pair_replays_another_ones_order():
    """`seed + epoch` made seed 1000 at epoch 1 the order of seed 1001 at epoch 0; each (seed, epoch) has its own."""
    orders = {(seed, epoch): tuple(epoch_permutation(50, seed, epoch).tolist())
              for seed in (0, 1, 2, 1000, 1001) for epoch in range(3)}
    assert len(set(orders.values())) == len(orders)
    assert orders[(1000, 1)] != orders[(1001, 0)] and orders[(0, 1)] != orders[(1, 0)]
    assert tuple(epoch_permutation(50, 1000, 1).tolist()) == orders[(1000, 1)]  # and it is the same every time
