"""A LeRobotDataset v3.0 writer for recorded episodes of any robot: parquet frames, mp4 videos, tasks, episodes
metadata (with any extra per-episode columns, such as the seed) and stats with quantiles.

Episodes are added one at a time and written `episodes_per_file` at a time, so a long recording never holds more
than one file's frames in memory. Camera stats are exact (per-channel histograms of the uint8 frames).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finetune.data.video import DEFAULT_CODEC, codec_name, encode_video

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


@dataclass
class Episode:
    task: str
    """The instruction."""
    state: np.ndarray
    """(T, state_dim) float32: observation.state at each frame."""
    action: np.ndarray
    """(T, action_dim) float32: the action taken at each frame."""
    frames: dict[str, np.ndarray]
    """Camera key (observation.images.<cam>) -> (T, H, W, 3) uint8."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Extra columns of this episode's row in meta/episodes (e.g. seed, task name)."""


def vector_stats(x: np.ndarray) -> dict[str, list]:
    x = np.asarray(x, np.float64)
    stats = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0)}
    stats |= {name: np.quantile(x, q, axis=0) for name, q in QUANTILES.items()}
    out = {k: v.astype(np.float32).tolist() for k, v in stats.items()}
    out["count"] = [len(x)]
    return out


def image_stats(histograms: np.ndarray, count: int) -> dict[str, list]:
    """Per-channel stats of uint8 frames scaled to [0, 1], shaped (3, 1, 1), from (3, 256) pixel histograms."""
    levels = np.arange(256, dtype=np.float64) / 255
    stats: dict[str, list] = {k: [] for k in ("mean", "std", "min", "max", *QUANTILES)}
    for hist in histograms.astype(np.float64):
        p = hist / hist.sum()
        mean = float((p * levels).sum())
        nonzero = np.nonzero(hist)[0]
        cdf = np.cumsum(p)
        values = {"mean": mean, "std": float(np.sqrt((p * (levels - mean) ** 2).sum())),
                  "min": levels[nonzero[0]], "max": levels[nonzero[-1]]}
        values |= {name: levels[min(np.searchsorted(cdf, q), 255)] for name, q in QUANTILES.items()}
        for k, v in values.items():
            stats[k].append([[float(v)]])
    stats["count"] = [count]
    return stats


def _fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, np.float32).reshape(-1), pa.float32()),
                                             x.shape[1])


class DatasetWriter:
    """Write episodes into a new LeRobotDataset v3.0 folder; `finish()` writes the metadata."""

    def __init__(self, root: str | Path, *, fps: int, robot_type: str, state_names: Sequence[str] | None = None,
                 action_names: Sequence[str] | None = None, episodes_per_file: int = 50,
                 codec: str = DEFAULT_CODEC, info_extra: Mapping[str, Any] | None = None):
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"{self.root} is not empty; pick a new folder for the dataset")
        if episodes_per_file < 1:
            raise ValueError("episodes_per_file must be positive")
        self.fps, self.robot_type, self.codec = fps, robot_type, codec
        self.state_names, self.action_names = state_names, action_names
        self.episodes_per_file = episodes_per_file
        self.info_extra = dict(info_extra or {})
        self.pending: list[Episode] = []
        self.tasks: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.states: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.histograms: dict[str, np.ndarray] = {}
        self.camera_shapes: dict[str, tuple[int, ...]] = {}
        self.encoder: str | None = None
        self.camera_keys: list[str] | None = None
        self.total_frames = 0
        self.files_written = 0

    def add(self, episode: Episode) -> None:
        n = len(episode.action)
        if n < 1 or len(episode.state) != n or any(len(f) != n for f in episode.frames.values()):
            raise ValueError(f"an episode needs the same positive number of states, actions and frames; got "
                             f"{len(episode.state)}, {n}, {[len(f) for f in episode.frames.values()]}")
        if self.camera_keys is None:
            self.camera_keys = sorted(episode.frames)
        elif sorted(episode.frames) != self.camera_keys:
            raise ValueError(f"every episode needs cameras {self.camera_keys}, got {sorted(episode.frames)}")
        if episode.task not in self.tasks:
            self.tasks.append(episode.task)
        self.pending.append(episode)
        if len(self.pending) >= self.episodes_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        chunk, file = divmod(self.files_written, CHUNKS_SIZE)
        first_index = len(self.rows)
        lengths = [len(ep.action) for ep in self.pending]
        lo = self.total_frames
        frame_index = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
        state = np.concatenate([ep.state for ep in self.pending]).astype(np.float32)
        action = np.concatenate([ep.action for ep in self.pending]).astype(np.float32)
        columns = {
            "observation.state": _fixed_list(state),
            "action": _fixed_list(action),
            "timestamp": pa.array((frame_index / self.fps).astype(np.float32)),
            "frame_index": pa.array(frame_index),
            "episode_index": pa.array(np.repeat(np.arange(first_index, first_index + len(lengths)), lengths)),
            "index": pa.array(np.arange(lo, lo + len(frame_index), dtype=np.int64)),
            "task_index": pa.array(np.repeat([self.tasks.index(ep.task) for ep in self.pending], lengths)
                                   .astype(np.int64)),
        }
        path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), path)
        for key in self.pending[0].frames:
            frames = np.concatenate([ep.frames[key] for ep in self.pending])
            self.camera_shapes[key] = frames.shape[1:]
            video = self.root / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            self.encoder = encode_video(frames, video, self.fps, self.codec)
            hist = np.stack([np.bincount(frames[..., c].ravel(), minlength=256) for c in range(3)])
            self.histograms[key] = self.histograms.get(key, 0) + hist
        start = 0.0
        for k, ep in enumerate(self.pending):
            n = lengths[k]
            row: dict[str, Any] = {
                "episode_index": first_index + k, "tasks": [ep.task], "length": n,
                "data/chunk_index": chunk, "data/file_index": file,
                "dataset_from_index": self.total_frames, "dataset_to_index": self.total_frames + n,
            }
            for key in ep.frames:
                row |= {f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                        f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": start + n / self.fps}
            row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0, **ep.metadata}
            self.rows.append(row)
            self.total_frames += n
            start += n / self.fps
        self.states.append(state)
        self.actions.append(action)
        self.files_written += 1
        self.pending = []

    def finish(self) -> Path:
        self._flush()
        if not self.rows:
            raise ValueError(f"no episode to write to {self.root}")
        episodes_file = self.root / EPISODES_PATH
        episodes_file.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.rows), episodes_file)
        pq.write_table(pa.table({"task_index": pa.array(range(len(self.tasks)), pa.int64()),
                                 "task": pa.array(self.tasks)}), self.root / "meta/tasks.parquet")
        states, actions = np.concatenate(self.states), np.concatenate(self.actions)
        features: dict[str, Any] = {
            "observation.state": {"dtype": "float32", "shape": [states.shape[1]],
                                  "names": list(self.state_names or [f"s{i}" for i in range(states.shape[1])])},
            "action": {"dtype": "float32", "shape": [actions.shape[1]],
                       "names": list(self.action_names or [f"a{i}" for i in range(actions.shape[1])])},
        }
        for key, (h, w, c) in self.camera_shapes.items():
            features[key] = {
                "dtype": "video", "shape": [h, w, c], "names": ["height", "width", "channels"],
                "info": {"video.height": h, "video.width": w, "video.codec": codec_name(self.encoder or self.codec),
                         "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": self.fps,
                         "video.channels": c, "has_audio": False},
            }
        for key in ("timestamp",):
            features[key] = {"dtype": "float32", "shape": [1], "names": None}
        for key in ("frame_index", "episode_index", "index", "task_index"):
            features[key] = {"dtype": "int64", "shape": [1], "names": None}
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type,
            "total_episodes": len(self.rows), "total_frames": self.total_frames, "total_tasks": len(self.tasks),
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "fps": self.fps, "splits": {"train": f"0:{len(self.rows)}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.camera_shapes else None, "features": features, **self.info_extra,
        }
        stats = {"observation.state": vector_stats(states), "action": vector_stats(actions)}
        stats |= {key: image_stats(hist, self.total_frames) for key, hist in self.histograms.items()}
        (self.root / "meta/info.json").write_text(json.dumps(info, indent=4))
        (self.root / "meta/stats.json").write_text(json.dumps(stats, indent=4))
        return self.root
