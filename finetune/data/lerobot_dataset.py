"""Reader for LeRobotDataset v3.0 folders (meta/, data/, videos/) serving frames with action chunks."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from finetune.data.video import FrameNotFound, VideoFrameReader, probe_video

CAMERA_DTYPES = ("video", "image")
# Bookkeeping columns every v3 data file has; loaded whatever the caller asked for.
INDEX_COLUMNS = ("episode_index", "frame_index", "index", "timestamp", "task_index")
# LeRobot's tolerance_s: how far a parquet timestamp may be from its place on the 1/fps grid, and from its video frame.
DEFAULT_TOLERANCE_S = 1e-4
TOLERANCE_HINT = "or relax --dataset.tolerance-s"


class DatasetError(ValueError):
    """A dataset folder is malformed; the message names the file, the field and how to fix it."""


@dataclass
class DatasetMeta:
    """The meta/ folder of a dataset: info.json, stats.json, tasks and episode rows (sorted by episode_index)."""

    root: Path
    info: dict
    features: dict[str, dict]
    fps: float
    stats: dict[str, dict[str, np.ndarray]]
    tasks: list[str]
    episodes: list[dict]

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") in CAMERA_DTYPES]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "video"]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "image"]

    @property
    def total_episodes(self) -> int:
        return len(self.episodes)

    @property
    def total_frames(self) -> int:
        return int(sum(ep["dataset_to_index"] - ep["dataset_from_index"] for ep in self.episodes))


def _read_parquet(path: Path, pointed_by: str, columns: Sequence[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"{path} not found ({pointed_by}); restore the file or fix the metadata that names it")
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: cannot read parquet ({e}); the file is corrupt or not parquet") from e


def _load_tasks(root: Path) -> list[str]:
    path = root / "meta/tasks.parquet"
    table = _read_parquet(path, "meta/tasks.parquet of a v3 dataset")
    # pandas writes the task strings as the index when they were the DataFrame index.
    text_col = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if text_col is None or "task_index" not in table.column_names:
        raise DatasetError(
            f"{path}: needs a 'task_index' column and task strings in 'task' (or the pandas index); "
            f"found columns {table.column_names}"
        )
    ids = table.column("task_index").to_pylist()
    texts = table.column(text_col).to_pylist()
    if sorted(ids) != list(range(len(ids))):
        raise DatasetError(f"{path}: 'task_index' must be 0..{len(ids) - 1} without gaps, found {sorted(ids)}")
    tasks = [""] * len(ids)
    for i, text in zip(ids, texts):
        tasks[i] = text
    return tasks


def _load_episodes(root: Path, info: dict) -> list[dict]:
    files = sorted((root / "meta/episodes").glob("*/*.parquet"))
    if not files:
        raise DatasetError(
            f"{root / 'meta/episodes'}: no chunk-XXX/file-XXX.parquet files; a v3 dataset lists its episodes there"
        )
    episodes: list[dict] = []
    for path in files:
        schema = pq.read_schema(path)
        # Per-episode stats columns are many and unused here.
        columns = [n for n in schema.names if not n.startswith("stats/")]
        episodes.extend(_read_parquet(path, "meta/episodes", columns).to_pylist())
    episodes.sort(key=lambda ep: ep.get("episode_index", -1))

    video_keys = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    required = ["episode_index", "dataset_from_index", "dataset_to_index", "data/chunk_index", "data/file_index"]
    for key in video_keys:
        required += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
    seen: set[int] = set()
    for ep in episodes:
        missing = [c for c in required if ep.get(c) is None]
        if missing:
            raise DatasetError(
                f"{root / 'meta/episodes'}: episode {ep.get('episode_index')} lacks {missing}; "
                "regenerate the episodes metadata (every episode row needs them)"
            )
        index, lo, hi = ep["episode_index"], ep["dataset_from_index"], ep["dataset_to_index"]
        if index in seen:
            raise DatasetError(f"{root / 'meta/episodes'}: episode_index {index} appears twice")
        seen.add(index)
        if not 0 <= lo < hi:
            raise DatasetError(
                f"{root / 'meta/episodes'}: episode {index} has dataset_from_index={lo}, dataset_to_index={hi}; "
                "need 0 <= from < to"
            )
        if ep.get("length") is not None and ep["length"] != hi - lo:
            raise DatasetError(
                f"{root / 'meta/episodes'}: episode {index} has length={ep['length']} but "
                f"dataset_to_index - dataset_from_index = {hi - lo}; fix one of them"
            )
    return episodes


def load_dataset_meta(root: str | Path) -> DatasetMeta:
    """Read and check meta/ (info.json, stats.json, tasks.parquet, episodes/) of a LeRobotDataset v3 folder."""
    root = Path(root)
    info_path = root / "meta/info.json"
    if not info_path.is_file():
        raise DatasetError(f"{info_path} not found; point to the root of a LeRobotDataset v3 folder (with meta/)")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{info_path}: invalid JSON ({e})") from e
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3"):
        raise DatasetError(
            f"{info_path}: 'codebase_version' is {version or 'missing'!r}; this reader needs v3.x "
            "(convert a v2.1 / v2.0 dataset with `finetune-convert DATASET`; finetune-train converts it itself)"
        )
    for field in ("fps", "features", "data_path"):
        if not info.get(field):
            raise DatasetError(f"{info_path}: field {field!r} is missing or empty; every v3 info.json has it")
    features = info["features"]
    if any(f.get("dtype") == "video" for f in features.values()) and not info.get("video_path"):
        raise DatasetError(f"{info_path}: has video features but no 'video_path' template")
    for key, feature in features.items():
        if "dtype" not in feature or "shape" not in feature:
            raise DatasetError(f"{info_path}: features[{key!r}] needs 'dtype' and 'shape'")

    stats: dict[str, dict[str, np.ndarray]] = {}
    stats_path = root / "meta/stats.json"
    if stats_path.is_file():  # optional here; normalization code reports its absence where it matters
        try:
            raw = json.loads(stats_path.read_text())  # Python's json reads NaN/Infinity: checked below
        except json.JSONDecodeError as e:
            raise DatasetError(f"{stats_path}: invalid JSON ({e}); recompute the dataset's stats") from e
        for key, values in raw.items():
            stats[key] = {name: np.asarray(v, dtype=np.float32) for name, v in values.items()}
            for name, array in stats[key].items():
                if not np.isfinite(array).all():
                    bad = "NaN" if np.isnan(array).any() else "inf"
                    raise DatasetError(
                        f"{stats_path}: {key!r} {name!r} holds {bad} (at flat position "
                        f"{int(np.flatnonzero(~np.isfinite(array.ravel()))[0])}); normalization would turn every "
                        "batch into NaN: recompute the stats from finite data (or drop rows with NaN values)"
                    )

    return DatasetMeta(
        root=root,
        info=info,
        features=features,
        fps=float(info["fps"]),
        stats=stats,
        tasks=_load_tasks(root),
        episodes=_load_episodes(root, info),
    )


def _hwc(feature: dict) -> tuple[int, ...]:
    """Expected (H, W, C) of a camera feature; some datasets list the shape channels-first."""
    shape, names = tuple(feature["shape"]), feature.get("names") or []
    if len(shape) == 3 and names and names[0] in ("channels", "channel", "c"):
        return shape[1], shape[2], shape[0]
    return shape


def _column_to_numpy(column: pa.ChunkedArray, key: str, feature: dict, path: Path) -> np.ndarray:
    """(N, *shape) array of a numeric column, checked against the feature's shape."""
    shape = tuple(feature["shape"])
    arr = column.combine_chunks()
    n = len(arr)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        expected = int(np.prod(shape[:1]))
        if n and (lengths != expected).any():
            found = int(lengths[np.argmax(lengths != expected)])
            raise DatasetError(
                f"{path}: column {key!r} holds vectors of shape ({found},) but meta/info.json "
                f"features[{key!r}]['shape'] is {shape}; fix the feature's shape or rewrite the column"
            )
        while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
            arr = arr.flatten()
        values = arr.to_numpy(zero_copy_only=False)
        if values.size != n * int(np.prod(shape)):
            raise DatasetError(
                f"{path}: column {key!r} has {values.size // max(n, 1)} values per row but meta/info.json "
                f"features[{key!r}]['shape'] is {shape}"
            )
        return values.reshape(n, *shape)
    if int(np.prod(shape)) != 1:
        raise DatasetError(
            f"{path}: column {key!r} holds scalars (shape (1,)) but meta/info.json features[{key!r}]['shape'] "
            f"is {shape}; fix the feature's shape or rewrite the column"
        )
    return arr.to_numpy(zero_copy_only=False).reshape(n, *shape)


_IMAGE_CELL = pa.struct([("bytes", pa.large_binary()), ("path", pa.large_string())])


def _image_cells(column: pa.ChunkedArray, key: str, path: Path) -> pa.StructArray:
    """An image column's cells as one Arrow array of {bytes, path}, checked to hold one or the other in every row."""
    cells = column.combine_chunks()
    names = [cells.type.field(i).name for i in range(cells.type.num_fields)] if pa.types.is_struct(cells.type) else []
    if "bytes" not in names and "path" not in names:
        raise DatasetError(f"{path}: image column {key!r} is {cells.type}, not a struct of 'bytes' and 'path' "
                           "(LeRobot's image feature); rewrite the column")

    def field(name: str, kind: pa.DataType) -> pa.Array:  # pc.struct_field: a null row gives a null field
        return pc.struct_field(cells, name).cast(kind) if name in names else pa.nulls(len(cells), kind)

    data, file = field("bytes", pa.large_binary()), field("path", pa.large_string())
    has = pc.or_(pc.fill_null(pc.greater(pc.binary_length(data), 0), False),
                 pc.fill_null(pc.greater(pc.binary_length(file), 0), False))
    if not pc.all(has).as_py():
        raise DatasetError(f"{path}: image column {key!r} has a row with neither 'bytes' nor 'path'")
    return pa.StructArray.from_arrays([data, file], fields=list(_IMAGE_CELL))


def _memory_mapped(arrays: dict[str, pa.Array]) -> dict[str, pa.Array]:
    """The arrays written to an Arrow file and read back memory-mapped: their bytes live in the page cache, shared by
    every process that maps them (forked DataLoader workers included) instead of in each process's heap, and no
    Python object per row is touched (and so copied) by a worker. The file (in $TMPDIR) is unlinked at once (the
    mapping stays); where it cannot be written, the arrays stay in memory, shared copy-on-write all the same."""
    if not arrays:
        return arrays
    fd, name = tempfile.mkstemp(prefix="finetune-images-", suffix=".arrow")
    try:
        os.close(fd)
        batch = pa.record_batch(list(arrays.values()), names=list(arrays))
        with pa.OSFile(name, "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        mapped = pa.ipc.open_file(pa.memory_map(name)).read_all()
    except (OSError, pa.ArrowException):  # e.g. a full $TMPDIR
        return arrays
    finally:
        os.unlink(name)
    return {key: mapped.column(key).chunk(0) for key in arrays}


def _spread_sample(rows: np.ndarray, episodes: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """`k` of `rows` (sorted), one from each of min(k, #episodes) random episodes first, the rest at random."""
    shuffled = rng.permutation(len(rows))
    _, first = np.unique(episodes[shuffled], return_index=True)  # one random row of each episode
    picked = shuffled[first[rng.permutation(len(first))[:k]]]
    rest = np.setdiff1d(shuffled, picked)
    picked = np.concatenate([picked, rng.choice(rest, k - len(picked), replace=False)])
    return np.sort(rows[picked])


class LeRobotDataset(torch.utils.data.Dataset):
    """Frames of a local LeRobotDataset v3 folder, each with the action chunk that starts there.

    Numeric columns and image bytes are loaded into memory at init; video frames are decoded on demand
    by a per-process reader (safe in DataLoader workers), whose headers are checked at init. Camera frames come as
    (3, H, W) float32 in [0, 1], or as uint8 with `uint8_images` (4x fewer bytes through a DataLoader; the training
    loop converts them on its device).
    """

    def __init__(
        self,
        root: str | Path,
        chunk_size: int,
        episodes: Sequence[int] | None = None,
        keys: Sequence[str] | None = None,
        video_cache_bytes: int = 1 << 30,
        uint8_images: bool = False,
        decoder_threads: int = 1,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        check_frames_per_file: int = 3,
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.meta = meta = load_dataset_meta(root)
        self.chunk_size = chunk_size
        by_index = {ep["episode_index"]: ep for ep in meta.episodes}
        if episodes is None:
            selected = list(by_index.values())
        else:
            unknown = [e for e in episodes if e not in by_index]
            if unknown:
                valid = sorted(by_index)
                raise DatasetError(
                    f"{meta.root}: episode(s) {unknown} not in the dataset; valid episode indices are "
                    f"{valid[0]}..{valid[-1]} ({len(valid)} episodes, see meta/episodes)"
                )
            selected = [by_index[e] for e in sorted(set(episodes))]
        if not selected:
            raise DatasetError(f"{meta.root}: no episodes selected; pass episodes=None for all of them")
        if keys is None:
            keys = [*meta.camera_keys, *(k for k in ("observation.state", "action") if k in meta.features)]
        unknown = [k for k in keys if k not in meta.features]
        if unknown:
            raise DatasetError(
                f"{meta.root / 'meta/info.json'}: unknown key(s) {unknown}; available features: {list(meta.features)}"
            )
        self.keys = list(dict.fromkeys(keys))
        self._video_keys = [k for k in self.keys if meta.features[k]["dtype"] == "video"]
        self._image_keys = [k for k in self.keys if meta.features[k]["dtype"] == "image"]
        self._value_keys = [k for k in self.keys if meta.features[k]["dtype"] not in CAMERA_DTYPES]
        if not tolerance_s >= 0:
            raise ValueError(f"--dataset.tolerance-s must be >= 0 seconds, got {tolerance_s}")
        self._tolerance = tolerance_s
        self.uint8_images = uint8_images
        self._videos = VideoFrameReader(video_cache_bytes, decoder_threads)
        self._load(selected)
        pa.default_memory_pool().release_unused()  # the parquet tables _load read: back to the system now
        self.check_timestamps()
        self._check_videos(selected)
        if check_frames_per_file:
            self.check_video_frames(check_frames_per_file)

    def _data_path(self, ep: dict) -> tuple[Path, str]:
        chunk, file = ep["data/chunk_index"], ep["data/file_index"]
        pointed = (
            f"meta/info.json 'data_path' with 'data/chunk_index'={chunk}, 'data/file_index'={file} "
            f"of episode {ep['episode_index']} in meta/episodes"
        )
        return self.meta.root / self.meta.info["data_path"].format(chunk_index=chunk, file_index=file), pointed

    def _read_data_file(self, path: Path, pointed: str) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """The wanted columns of one data file, its row order sorted by (episode, frame), and the sorted episodes."""
        if not path.is_file():
            raise DatasetError(f"{path} not found ({pointed}); restore it or fix the episode metadata")
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{path}: cannot read parquet ({e}); the file is truncated or not parquet, "
                               "restore it from the dataset's source") from e
        wanted = list(dict.fromkeys([*INDEX_COLUMNS, *self._value_keys, *self._image_keys]))
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing} named in meta/info.json features; found {names}")
        table = _read_parquet(path, pointed, wanted)
        episode_col = table.column("episode_index").to_numpy()
        order = np.lexsort((table.column("frame_index").to_numpy(), episode_col))  # one sort per file: O(rows log)
        return table, order, episode_col[order]

    def _load(self, selected: list[dict]) -> None:
        meta = self.meta
        parts: dict[str, list[np.ndarray]] = {k: [] for k in (*INDEX_COLUMNS, *self._value_keys)}
        images: dict[str, list[pa.StructArray]] = {k: [] for k in self._image_keys}
        # Consecutive selected episodes in one data file form a run: the file is read and sorted once, and the run's
        # rows are taken and converted together (loading is O(rows), not O(episodes x rows)).
        runs: list[tuple[Path, str, list[dict]]] = []
        for ep in selected:
            path, pointed = self._data_path(ep)
            if runs and runs[-1][0] == path:
                runs[-1][2].append(ep)
            else:
                runs.append((path, pointed, [ep]))
        loaded: tuple[Path, pa.Table, np.ndarray, np.ndarray] | None = None
        for path, pointed, group in runs:
            if loaded is None or loaded[0] != path:
                loaded = (path, *self._read_data_file(path, pointed))
            _, table, order, sorted_episodes = loaded
            ids = np.asarray([ep["episode_index"] for ep in group])
            first, last = np.searchsorted(sorted_episodes, ids, "left"), np.searchsorted(sorted_episodes, ids, "right")
            rows = np.concatenate([order[a:b] for a, b in zip(first, last)])
            part = table.take(rows)
            expected = np.concatenate([np.arange(ep["dataset_from_index"], ep["dataset_to_index"]) for ep in group])
            found = part.column("index").to_numpy()
            if len(found) != len(expected) or not np.array_equal(found, expected):
                self._raise_index_mismatch(path, group, last - first, found)
            for key in parts:
                feature = meta.features.get(key, {"shape": [1]})
                values = _column_to_numpy(part.column(key), key, feature, path)
                parts[key].append(values[:, 0] if key in INDEX_COLUMNS else values)
            for key in self._image_keys:
                images[key].append(_image_cells(part.column(key), key, path))
        self._video_at: dict[str, list[tuple[str, float]]] = {k: [] for k in self._video_keys}
        for ep in selected:
            for key in self._video_keys:
                self._video_at[key].append((self._video_path(ep, key), float(ep[f"videos/{key}/from_timestamp"])))
        ends = np.cumsum([ep["dataset_to_index"] - ep["dataset_from_index"] for ep in selected])

        def cat(key: str, dtype: type) -> np.ndarray:
            return np.concatenate(parts[key]).astype(dtype, copy=False) if parts[key] else np.zeros(0, dtype)

        self._episode_index = cat("episode_index", np.int64)
        self._frame_index = cat("frame_index", np.int64)
        self._global_index = cat("index", np.int64)
        self._timestamp = cat("timestamp", np.float64)
        self._task_index = cat("task_index", np.int64)
        self._values = {}
        for key in self._value_keys:
            dtype = np.float32 if np.issubdtype(parts[key][0].dtype, np.floating) else parts[key][0].dtype
            self._values[key] = np.concatenate(parts[key]).astype(dtype, copy=False)
        self._images = _memory_mapped({k: pa.concat_arrays(v) if v else pa.array([], _IMAGE_CELL)
                                       for k, v in images.items()})
        # Per frame: the position of its episode in `selected`, and that episode's frame range here.
        self._frame_episode = np.repeat(np.arange(len(selected)), np.diff([0, *ends]))
        self._episode_end = np.asarray(ends, np.int64)
        bad_tasks = self._task_index[(self._task_index < 0) | (self._task_index >= len(meta.tasks))]
        if len(bad_tasks):
            raise DatasetError(
                f"{meta.root}: data files use task_index {int(bad_tasks[0])} but meta/tasks.parquet has "
                f"{len(meta.tasks)} tasks"
            )

    def _video_path(self, ep: dict, key: str) -> str:
        chunk_v, file_v = ep[f"videos/{key}/chunk_index"], ep[f"videos/{key}/file_index"]
        video = self.meta.root / self.meta.info["video_path"].format(video_key=key, chunk_index=chunk_v,
                                                                     file_index=file_v)
        if not video.is_file():
            raise DatasetError(
                f"{video} not found (meta/info.json 'video_path' with 'videos/{key}/chunk_index'={chunk_v}, "
                f"'videos/{key}/file_index'={file_v} of episode {ep['episode_index']} in meta/episodes); "
                "restore it or fix the episode metadata"
            )
        return str(video)

    def _check_videos(self, selected: list[dict]) -> None:
        """Open each video's header once: a truncated file, or an episode whose parquet rows run past the end of its
        video, is reported now rather than in a DataLoader worker mid-run."""
        headers = {}
        last_rows = self._episode_end - 1
        for key, places in self._video_at.items():
            for (path, start), ep, last in zip(places, selected, last_rows):
                if path not in headers:
                    try:
                        headers[path] = probe_video(path)
                    except (av.FFmpegError, OSError) as e:
                        raise DatasetError(f"{path}: cannot read video ({e}); the file is truncated or not an mp4 "
                                           f"({key!r}), restore it from the dataset's source") from e
                info, needed = headers[path], start + float(self._timestamp[last])
                if needed > info.last_time + self._tolerance + 1e-6:
                    raise DatasetError(
                        f"{path}: episode {ep['episode_index']} needs {key!r} frames up to t={needed:.3f}s "
                        f"(videos/{key}/from_timestamp {start:.3f} + its last parquet timestamp "
                        f"{float(self._timestamp[last]):.3f}) but the video ends at {info.last_time:.3f}s "
                        f"({info.frames} frames at {info.fps:g} fps): the parquet and video lengths disagree; "
                        "re-encode the video or fix the episode's from_timestamp / data rows"
                    )

    def check_timestamps(self) -> None:
        """LeRobot's check_timestamps_sync: within each episode, consecutive parquet timestamps are 1/fps apart
        within the tolerance (plus the float32 rounding of the timestamps). DatasetError names the first violation."""
        ts = self._timestamp
        if len(ts) < 2:
            return
        gaps = np.diff(ts)
        off = np.abs(gaps - 1.0 / self.meta.fps)
        allowed = self._tolerance + 1e-9 + np.spacing(np.abs(ts[1:]).astype(np.float32)).astype(np.float64)
        bad = off > allowed
        bad[self._episode_end[:-1] - 1] = False  # the step from one episode's last frame to the next one's first
        if bad.any():
            row = int(np.argmax(bad)) + 1
            raise DatasetError(
                f"{self.meta.root}: episode {int(self._episode_index[row])}, frame {int(self._frame_index[row])}: "
                f"parquet timestamp {ts[row]:.6f}s is {gaps[row - 1]:.6f}s after the previous frame's, not "
                f"1/fps = {1 / self.meta.fps:.6f}s (off by {off[row - 1]:.6f}s, over the {self._tolerance:g}s "
                f"tolerance): fix the data's timestamps, {TOLERANCE_HINT}"
            )

    def check_video_frames(self, frames_per_file: int | None = 3, seed: int = 0) -> int:
        """Decode frames by random access, as training does, each checked to have a frame within the tolerance:
        `frames_per_file` random rows of each video file, from as many different episodes (None: every row).
        DatasetError names the first failure; returns the number of frames checked. Decoding is by a reader of its
        own (no cache), closed after."""
        rng = np.random.default_rng(seed)
        reader = VideoFrameReader(cache_bytes=0, decoder_threads=self._videos.decoder_threads)
        checked = 0
        try:
            for key, places in self._video_at.items():
                paths = np.asarray([path for path, _ in places])[self._frame_episode]
                for path in dict.fromkeys(paths.tolist()):
                    rows = np.flatnonzero(paths == path)
                    if frames_per_file is not None and len(rows) > frames_per_file:
                        rows = _spread_sample(rows, self._frame_episode[rows], frames_per_file, rng)
                    for i in rows.tolist():
                        start = places[int(self._frame_episode[i])][1]
                        try:
                            reader.frame_at(path, start + float(self._timestamp[i]), self._tolerance)
                        except FrameNotFound as err:
                            raise self._frame_not_found(key, i, start, err) from err
                        except (av.FFmpegError, OSError) as err:
                            raise DatasetError(
                                f"{path}: cannot decode the {key!r} frame of episode {int(self._episode_index[i])}, "
                                f"frame {int(self._frame_index[i])} ({err}); re-encode the video"
                            ) from err
                        checked += 1
        finally:
            reader.close()
        return checked

    def _frame_not_found(self, key: str, i: int, start: float, err: FrameNotFound) -> DatasetError:
        episode, frame = int(self._episode_index[i]), int(self._frame_index[i])
        where = (f"{self.meta.root}: {key!r} of episode {episode}, frame {frame}"
                 f" (parquet timestamp {float(self._timestamp[i]):.6f}s + videos/{key}/from_timestamp {start:.6f}s)")
        if err.nearest is None:
            return DatasetError(f"{where}: {err.path} has no frame near t={err.t:.6f}s; re-encode the video or fix "
                                "the episode's from_timestamp")
        return DatasetError(
            f"{where}: the nearest frame of {err.path} is at {err.nearest:.6f}s, {err.gap:.6f}s from "
            f"t={err.t:.6f}s (over the {self._tolerance:g}s tolerance): the timestamps and the video disagree; fix "
            f"the timestamps or from_timestamp, {TOLERANCE_HINT}"
        )

    @staticmethod
    def _raise_index_mismatch(path: Path, group: list[dict], counts: np.ndarray, found: np.ndarray) -> None:
        offset = 0
        for ep, count in zip(group, counts.tolist()):
            lo, hi = ep["dataset_from_index"], ep["dataset_to_index"]
            if not np.array_equal(found[offset : offset + count], np.arange(lo, hi)):
                raise DatasetError(
                    f"{path}: episode {ep['episode_index']} has {count} rows with 'index' not equal to "
                    f"dataset_from_index..dataset_to_index-1 = {lo}..{hi - 1} from meta/episodes; "
                    "the episode metadata and the data file disagree, regenerate one of them"
                )
            offset += count
        raise DatasetError(f"{path}: 'index' column disagrees with meta/episodes; regenerate one of them")

    def __len__(self) -> int:
        return len(self._frame_index)

    def _camera(self, key: str, i: int, e: int) -> torch.Tensor:
        if key in self._video_at:
            path, start = self._video_at[key][e]
            try:
                frame = self._videos.frame_at(path, start + float(self._timestamp[i]), self._tolerance)
            except FrameNotFound as err:
                raise self._frame_not_found(key, i, start, err) from err
            source = path
        else:
            data, file = self._images[key].field("bytes")[i], self._images[key].field("path")[i]
            cell = data.as_py() if data.is_valid and len(data.as_buffer()) else str(self.meta.root / file.as_py())
            source = cell if isinstance(cell, str) else f"{key} column, frame {int(self._global_index[i])}"
            with Image.open(cell if isinstance(cell, str) else io.BytesIO(cell)) as img:
                frame = np.array(img.convert("RGB"))  # writable, as torch.from_numpy wants
        expected = _hwc(self.meta.features[key])
        if frame.shape != expected:
            raise DatasetError(
                f"{source}: decoded frames of {key!r} have shape {frame.shape} but meta/info.json "
                f"features[{key!r}]['shape'] says {tuple(self.meta.features[key]['shape'])}"
            )
        image = torch.from_numpy(frame).permute(2, 0, 1)
        # contiguous(): a copy, so a caller writing into the image never alters the reader's cached frame
        return image.contiguous() if self.uint8_images else image.float().div_(255)

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range for a dataset of {n} frames")
        i = int(i) % n
        e = int(self._frame_episode[i])
        item: dict = {key: self._camera(key, i, e) for key in (*self._video_keys, *self._image_keys)}
        for key, values in self._values.items():
            if key == "action":
                steps = i + np.arange(self.chunk_size)
                last = int(self._episode_end[e]) - 1
                item["action"] = torch.from_numpy(values[np.minimum(steps, last)])
                item["action_is_pad"] = torch.from_numpy(steps > last)
            else:
                item[key] = torch.from_numpy(values[i].copy())
        item["task"] = self.meta.tasks[int(self._task_index[i])]
        item["episode_index"] = int(self._episode_index[i])
        item["frame_index"] = int(self._frame_index[i])
        item["index"] = int(self._global_index[i])
        item["timestamp"] = float(self._timestamp[i])
        return item
