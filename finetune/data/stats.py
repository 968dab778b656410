"""Normalization stats in LeRobot's meta/stats.json layout, computed from a dataset's files (`finetune-stats`).

Per feature: mean, std, min, max, count and the quantiles q01, q10, q50, q90, q99. Vectors (state, action, ...) over
every frame; cameras per channel over sampled frames (LeRobot's per-episode sampling), scaled to [0, 1] and shaped
(3, 1, 1) as LeRobot stores them. Quantiles use LeRobot's estimator (RunningQuantileStats): a 5000-bin histogram
between min and max, linearly interpolated inside the bin that holds the target count. Unlike LeRobot's per-episode
aggregation, the histogram covers the whole dataset (as LeRobot's relative-action stats and openpi's norm stats do),
so q01/q99 are the dataset's quantiles, not an envelope of per-episode ones.

Stats of several datasets merge as LeRobot's `aggregate_stats`: means weighted by count, the parallel-variance formula
for std, min of mins, max of maxes; quantiles at or below q50 take the minimum over datasets, above q50 the maximum
(a conservative envelope: exact global quantiles cannot be recovered from per-dataset summaries).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tyro
from tqdm.auto import tqdm

from finetune.data.lerobot_dataset import DatasetError
from finetune.entry import console_script, exit_on

QUANTILES: dict[str, float] = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STAT_NAMES = ("mean", "std", "min", "max", "count", *QUANTILES)
NUM_BINS = 5000  # LeRobot's RunningQuantileStats default
EDGE_PAD = 1e-10
CAMERA_DTYPES = ("video", "image")
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
# Statistics each normalization mode reads (LeRobot's NormalizationMode names).
NEEDED_STATS = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"),
                "QUANTILE10": ("q10", "q90"), "IDENTITY": ()}
STATS_COMMAND = "finetune-stats"


class StatsError(DatasetError):
    """Stats that cannot be computed or are missing; the message names the feature and the fix."""


# --- the estimators ---------------------------------------------------------------------------------------------------

def histogram_quantiles(hist: np.ndarray, edges: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """LeRobot's quantile read-out of per-dimension histograms (D, B) with edges (D, B + 1)."""
    out = {}
    cumsum = np.cumsum(hist, axis=1)
    for name, q in QUANTILES.items():
        target = q * count
        values = np.empty(len(hist))
        for d in range(len(hist)):
            idx = int(np.searchsorted(cumsum[d], target))
            if idx == 0:
                values[d] = edges[d, 0]
            elif idx >= hist.shape[1]:
                values[d] = edges[d, -1]
            else:
                before, inside = cumsum[d, idx - 1], cumsum[d, idx] - cumsum[d, idx - 1]
                frac = 0.0 if inside == 0 else (target - before) / inside
                values[d] = edges[d, idx] + frac * (edges[d, idx + 1] - edges[d, idx])
        out[name] = values
    return out


def _edges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.stack([np.linspace(a - EDGE_PAD, b + EDGE_PAD, NUM_BINS + 1) for a, b in zip(lo, hi)])


def vector_stats(batches: Callable[[], Iterable[np.ndarray]]) -> dict[str, np.ndarray]:
    """Stats of (N, D) batches, streamed twice: count/sum/min/max first, then squared deviations and histograms
    (whose range is then known, so no re-binning). `batches()` must yield the same data each time."""
    count, total, lo, hi = 0, None, None, None
    for x in batches():
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        if not len(x):
            continue
        count += len(x)
        total = x.sum(0) if total is None else total + x.sum(0)
        lo = x.min(0) if lo is None else np.minimum(lo, x.min(0))
        hi = x.max(0) if hi is None else np.maximum(hi, x.max(0))
    if count < 2:
        raise StatsError(f"need at least 2 values to compute stats, got {count}")
    mean = total / count
    edges = _edges(lo, hi)
    squares, hist = np.zeros_like(mean), np.zeros((len(mean), NUM_BINS))
    for x in batches():
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        squares += ((x - mean) ** 2).sum(0)
        for d in range(x.shape[1]):
            hist[d] += np.histogram(x[:, d], bins=edges[d])[0]
    stats = {"mean": mean, "std": np.sqrt(squares / count), "min": lo, "max": hi, "count": np.array([count])}
    return stats | histogram_quantiles(hist, edges, count)


def array_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """vector_stats of one in-memory (N, D) array (what the dataset writer uses)."""
    return vector_stats(lambda: [x])


class ImageStats:
    """Per-channel stats of uint8 RGB frames, exact through 256-level histograms; reported in [0, 1], (3, 1, 1)."""

    def __init__(self):
        self.levels = np.zeros((3, 256), np.int64)
        self.frames = 0

    def update(self, frames: np.ndarray) -> None:
        """frames: (N, H, W, 3) uint8."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise StatsError(f"image stats need (N, H, W, 3) uint8 frames, got {frames.dtype} {frames.shape}")
        for ch in range(3):
            self.levels[ch] += np.bincount(frames[..., ch].ravel(), minlength=256)
        self.frames += len(frames)

    def result(self) -> dict[str, np.ndarray]:
        if self.frames == 0:
            raise StatsError("no frames were sampled for image stats")
        values = np.arange(256, dtype=np.float64)
        pixels = self.levels.sum(1)
        mean = (self.levels * values).sum(1) / pixels
        std = np.sqrt((self.levels * (values - mean[:, None]) ** 2).sum(1) / pixels)
        lo = np.array([np.flatnonzero(c)[0] for c in self.levels], np.float64)
        hi = np.array([np.flatnonzero(c)[-1] for c in self.levels], np.float64)
        edges = _edges(lo, hi)
        hist = np.stack([np.histogram(values, bins=edges[c], weights=self.levels[c])[0] for c in range(3)])
        stats = {"mean": mean, "std": std, "min": lo, "max": hi} | histogram_quantiles(hist, edges, int(pixels[0]))
        out = {k: (v / 255.0).reshape(3, 1, 1) for k, v in stats.items()}
        out["count"] = np.array([self.frames])
        return out


def image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    acc = ImageStats()
    acc.update(frames)
    return acc.result()


def to_json(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """stats.json values: float32-rounded lists (count as an int list)."""
    out = {}
    for key, values in stats.items():
        out[key] = {name: (np.asarray(v).astype(np.int64).tolist() if name == "count"
                           else np.asarray(v, np.float64).astype(np.float32).tolist()) for name, v in values.items()}
    return out


# --- merging across datasets ------------------------------------------------------------------------------------------

def aggregate_feature_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """One feature's stats over several datasets, as LeRobot aggregates them (see the module docstring)."""
    means = np.stack([np.asarray(p["mean"], np.float64) for p in parts])
    variances = np.stack([np.asarray(p["std"], np.float64) ** 2 for p in parts])
    counts = np.array([float(np.asarray(p["count"]).reshape(-1)[0]) for p in parts])
    weights = counts.reshape(-1, *([1] * (means.ndim - 1)))
    total = counts.sum()
    mean = (means * weights).sum(0) / total
    variance = ((variances + (means - mean) ** 2) * weights).sum(0) / total
    out = {"mean": mean, "std": np.sqrt(variance),
           "min": np.min(np.stack([np.asarray(p["min"], np.float64) for p in parts]), 0),
           "max": np.max(np.stack([np.asarray(p["max"], np.float64) for p in parts]), 0),
           "count": np.array([int(total)])}
    for name in QUANTILES:
        if all(name in p for p in parts):
            values = np.stack([np.asarray(p[name], np.float64) for p in parts])
            out[name] = values.min(0) if int(name[1:]) <= 50 else values.max(0)
    return out


def aggregate_stats(stats_list: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, np.ndarray]]:
    """Union of the features of several datasets' stats, each merged over the datasets that have it."""
    keys = list(dict.fromkeys(k for stats in stats_list for k in stats))
    return {k: aggregate_feature_stats([s[k] for s in stats_list if k in s]) for k in keys}


# --- reading a dataset ------------------------------------------------------------------------------------------------

def _column_array(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return np.asarray(arr.to_numpy(zero_copy_only=False), np.float64).reshape(n, -1)


def _data_files(root: Path) -> list[Path]:
    files = sorted((root / "data").glob("*/*.parquet"))
    if not files:
        raise StatsError(f"{root / 'data'}: no chunk-XXX/file-XXX.parquet files to compute stats from")
    return files


def _column_batches(root: Path, keys: Sequence[str], desc: str, episodes: set[int] | None = None,
                    progress: bool = True) -> Iterable[dict[str, np.ndarray]]:
    """Per record batch of each data file: {key: (n, D) float64}, filtered to `episodes` when given."""
    columns = [*keys, "episode_index"]
    for path in tqdm(_data_files(root), desc=desc, unit="file", leave=False, disable=not progress):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16, columns=columns):
            keep = None
            if episodes is not None:
                keep = np.isin(batch.column("episode_index").to_numpy(), list(episodes))
            out = {}
            for key in keys:
                values = _column_array(batch.column(key))
                out[key] = values if keep is None else values[keep]
            yield out


def numeric_keys(meta) -> list[str]:
    """Features that get vector stats: numeric, not a camera, not a bookkeeping column."""
    return [k for k, f in meta.features.items()
            if f.get("dtype") not in (*CAMERA_DTYPES, "string", "language") and k not in BOOKKEEPING]


def sample_indices(length: int, min_samples: int = 100, max_samples: int = 10_000, power: float = 0.75) -> list[int]:
    """Frames of one episode that image stats read (LeRobot's heuristic: all of an episode up to 100 frames, then
    length ** 0.75, evenly spread)."""
    low = min(min_samples, length)
    n = max(low, min(int(length**power), max_samples))
    return np.round(np.linspace(0, length - 1, n)).astype(int).tolist()


def _as_uint8_hwc(frame: Any) -> np.ndarray:
    array = frame.numpy() if hasattr(frame, "numpy") else np.asarray(frame)
    if array.dtype != np.uint8:  # float in [0, 1]
        array = np.clip(np.round(array * 255), 0, 255).astype(np.uint8)
    return array.transpose(1, 2, 0) if array.shape[0] == 3 and array.shape[-1] != 3 else array


def compute_dataset_stats(root: str | Path, keys: Sequence[str] | None = None, progress: bool = True
                          ) -> dict[str, dict[str, np.ndarray]]:
    """Stats of `keys` (default: every numeric feature and every camera) from the dataset's files."""
    from finetune.data.lerobot_dataset import LeRobotDataset, load_dataset_meta

    meta = load_dataset_meta(root)
    wanted = list(keys) if keys is not None else [*numeric_keys(meta), *meta.camera_keys]
    unknown = [k for k in wanted if k not in meta.features]
    if unknown:
        raise StatsError(f"{meta.root}: no feature(s) {unknown}; features are {list(meta.features)}")
    vectors = [k for k in wanted if k not in meta.camera_keys]
    cameras = [k for k in wanted if k in meta.camera_keys]
    out: dict[str, dict[str, np.ndarray]] = {}
    for key in vectors:
        out[key] = vector_stats(lambda key=key: (b[key] for b in _column_batches(meta.root, [key], f"stats {key}",
                                                                                 progress=progress)))
    if cameras:
        reader = LeRobotDataset(meta.root, 1, keys=cameras)
        accs = {k: ImageStats() for k in cameras}
        starts = np.cumsum([0] + [ep["dataset_to_index"] - ep["dataset_from_index"] for ep in meta.episodes])
        rows = [int(starts[e]) + i for e in range(len(meta.episodes))
                for i in sample_indices(int(starts[e + 1] - starts[e]))]
        for row in tqdm(rows, desc="image stats", unit="frame", disable=not progress):
            item = reader[row]
            for key in cameras:
                accs[key].update(_as_uint8_hwc(item[key])[None])
        out |= {k: acc.result() for k, acc in accs.items()}
    return out


def relative_action_stats(root: str | Path, chunk_size: int, mask: Sequence[bool],
                          state_key: str = "observation.state", action_key: str = "action") -> dict[str, np.ndarray]:
    """Stats of the relative actions of every in-episode chunk of a dataset (LeRobot's compute_relative_action_stats).
    """
    parts = []
    for path in sorted(Path(root, "data").glob("*/*.parquet")):
        table = pq.read_table(path, columns=[state_key, action_key, "episode_index", "index"])
        parts.append({k: table.column(k).to_pylist() for k in table.column_names})
    index = np.concatenate([np.asarray(p["index"]) for p in parts])
    order = np.argsort(index, kind="stable")
    states = np.concatenate([np.asarray(p[state_key], np.float32) for p in parts])[order]
    actions = np.concatenate([np.asarray(p[action_key], np.float32) for p in parts])[order]
    episodes = np.concatenate([np.asarray(p["episode_index"]) for p in parts])[order]
    if len(actions) < chunk_size:
        raise ValueError(f"{root}: {len(actions)} frames, fewer than one chunk of {chunk_size}")
    starts = np.arange(len(actions) - chunk_size + 1)
    starts = starts[episodes[starts] == episodes[starts + chunk_size - 1]]
    if not len(starts):
        raise ValueError(f"{root}: no episode is as long as one action chunk ({chunk_size} frames)")
    m = np.asarray(mask, np.float32)

    def batches():
        for lo in range(0, len(starts), 4096):
            s = starts[lo : lo + 4096]
            chunks = actions[s[:, None] + np.arange(chunk_size)[None, :]].copy()
            chunks[..., : len(m)] -= states[s][:, None, : len(m)] * m
            yield chunks.reshape(-1, actions.shape[1])

    return vector_stats(batches)


def needed_stats(normalization_mapping: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """{feature: stat names} a policy's normalization reads for its state and action."""
    return {key: NEEDED_STATS.get(normalization_mapping.get(kind, "IDENTITY"), ())
            for key, kind in (("observation.state", "STATE"), ("action", "ACTION"))}


def missing_stats(stats: Mapping[str, Mapping[str, Any]], needed: Mapping[str, Sequence[str]]) -> dict[str, list]:
    """{feature: [missing stat names]} for what `needed` asks and `stats` lacks."""
    out = {}
    for key, names in needed.items():
        lacking = [n for n in names if n not in stats.get(key, {})]
        if lacking:
            out[key] = lacking
    return out


def check_stats(stats: Mapping[str, Mapping[str, Any]], needed: Mapping[str, Sequence[str]], root: str | Path) -> None:
    """Refuse training on a dataset whose stats.json lacks what the policy's normalization reads."""
    missing = missing_stats(stats, needed)
    if missing:
        what = ", ".join(f"{k} {v}" for k, v in missing.items())
        raise StatsError(f"{Path(root) / 'meta/stats.json'} lacks the normalization stats the policy needs ({what}); "
                         f"compute them with `{STATS_COMMAND} {root}` (add --missing-only to keep the others)")


def write_stats(root: str | Path, missing_only: bool = False, keys: Sequence[str] | None = None,
                progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Compute stats and write meta/stats.json; with missing_only, only features absent or lacking a statistic."""
    from finetune.data.lerobot_dataset import load_dataset_meta

    meta = load_dataset_meta(root)
    path = meta.root / "meta/stats.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    wanted = list(keys) if keys is not None else [*numeric_keys(meta), *meta.camera_keys]
    if missing_only:
        wanted = [k for k in wanted if any(n not in existing.get(k, {}) for n in STAT_NAMES)]
    computed = compute_dataset_stats(meta.root, wanted, progress) if wanted else {}
    merged = existing | to_json(computed)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=4))
    tmp.replace(path)
    return computed


@dataclass(frozen=True)
class StatsConfig:
    dataset: Annotated[str, tyro.conf.Positional]
    """LeRobotDataset v3.0 folder; its meta/stats.json is (re)written."""
    missing_only: bool = False
    """Only compute features that stats.json lacks (or that lack one of mean/std/min/max/count/q01..q99)."""
    keys: tuple[str, ...] | None = None
    """Only these features (default: every numeric feature and every camera)."""


def main(argv: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    cfg = tyro.cli(StatsConfig, args=argv, description="Compute a LeRobot dataset's meta/stats.json.")
    with exit_on(StatsError, DatasetError):
        computed = write_stats(cfg.dataset, cfg.missing_only, cfg.keys)
    names = ", ".join(computed) or "nothing (all present)"
    print(f"{Path(cfg.dataset) / 'meta/stats.json'}: computed {names}")
    return computed


cli = console_script(main)


if __name__ == "__main__":
    cli()
