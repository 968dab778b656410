"""A LeRobotDataset v2.1 / v2.0 writer for tests: the episodes of a v3.0 dataset rewritten in the legacy layout
(one parquet file and one mp4 per episode, each video starting at t=0, meta/*.jsonl, per-episode stats)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from finetune.data import LeRobotDataset, encode_video, load_dataset_meta
from finetune.data.stats import array_stats, image_stats, to_json

DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
LEGACY_STATS = ("mean", "std", "min", "max", "count")


def write_legacy_dataset(v3_root: Path, dest: Path, version: str = "v2.1", chunks_size: int = 1000) -> Path:
    """`dest`: the episodes of the v3.0 dataset `v3_root` in the v2.x layout. Videos are decoded and re-encoded one
    file per episode; image columns keep their PNG bytes."""
    meta = load_dataset_meta(v3_root)
    reader = LeRobotDataset(v3_root, 1, keys=meta.camera_keys, uint8_images=True)
    table = pq.read_table(sorted((v3_root / "data").glob("*/*.parquet")))
    episodes_rows, stats_rows = [], []
    for ep in meta.episodes:
        index, lo, hi = ep["episode_index"], ep["dataset_from_index"], ep["dataset_to_index"]
        chunk = index // chunks_size
        rows = table.filter(pc.equal(table.column("episode_index"), index))
        for name in ("observation.state", "action"):  # Hugging Face datasets writes vectors as variable-size lists
            rows = rows.set_column(rows.schema.get_field_index(name), name,
                                   rows.column(name).cast(pa.list_(pa.float32())))
        path = dest / DATA_PATH.format(episode_chunk=chunk, episode_index=index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, path)
        stats = {k: array_stats(np.asarray(rows.column(k).to_pylist(), np.float64).reshape(rows.num_rows, -1))
                 for k in ("observation.state", "action")}
        for key in meta.camera_keys:
            frames = np.stack([reader[i][key].permute(1, 2, 0).numpy() for i in range(lo, hi)])  # all episodes
            stats[key] = image_stats(frames)
            if key in meta.video_keys:
                encode_video(frames, dest / VIDEO_PATH.format(episode_chunk=chunk, video_key=key, episode_index=index),
                             meta.fps)
        episodes_rows.append({"episode_index": index, "tasks": list(ep["tasks"]), "length": hi - lo})
        # as LeRobot v2.1 writes them: mean, std, min, max and count, no quantiles
        stats_rows.append({"episode_index": index, "stats": {k: {n: v for n, v in s.items() if n in LEGACY_STATS}
                                                             for k, s in to_json(stats).items()}})
    info = {k: v for k, v in meta.info.items() if k not in ("data_files_size_in_mb", "video_files_size_in_mb")}
    info |= {"codebase_version": version, "data_path": DATA_PATH, "video_path": VIDEO_PATH if meta.video_keys else None,
             "chunks_size": chunks_size, "total_chunks": meta.episodes[-1]["episode_index"] // chunks_size + 1,
             "total_videos": len(meta.video_keys) * len(meta.episodes)}
    (dest / "meta").mkdir(parents=True, exist_ok=True)
    (dest / "meta/info.json").write_text(json.dumps(info, indent=4))
    (dest / "meta/episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in episodes_rows))
    (dest / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                   for i, t in enumerate(meta.tasks)))
    if version == "v2.1":
        (dest / "meta/episodes_stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stats_rows))
    else:  # v2.0: one stats.json
        (dest / "meta/stats.json").write_text((v3_root / "meta/stats.json").read_text())
    return dest
