"""`finetune-check DATASET...`: find what is wrong with a LeRobotDataset (v3.0, v2.1 or v2.0) before training on it.

Checks, each finding with the fix: version and layout (info.json, episodes and tasks metadata, every data and video
file the metadata names), features against the data files (columns, vector shapes, non-finite values), episodes
(rows against their length, frame_index runs, index continuity, episode numbering), timestamp sync (consecutive
timestamps 1/fps apart within LeRobot's 1e-4 s), tasks, stats sanity (present, finite, std > 0, min <= max, shapes
against features, the quantiles pi0.5 normalizes with) and, unless `quick`, each video file's header, its coverage
of its episodes and a sample of random frames decoded at from_timestamp + frame_index / fps (where the parquet
timestamps put them once they pass the sync check).

Training runs the quick part (no video is opened) on every dataset at start: errors stop it, warnings are printed.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tyro
from PIL import Image

from finetune.data import lerobot_dataset as v3
from finetune.data.lerobot_dataset import CAMERA_DTYPES, INDEX_COLUMNS, DatasetError
from finetune.data.stats import BOOKKEEPING, QUANTILES, aggregate_stats
from finetune.data.v21 import CONVERT_COMMAND, LEGACY_VERSIONS, check_info, load_legacy
from finetune.data.video import FrameNotFound, VideoFrameReader, probe_video

log = logging.getLogger(__name__)
TOLERANCE_S = 1e-4  # LeRobot's tolerance_s, for timestamps against 1/fps and for video frame lookup
ERROR, WARNING = "error", "warning"
# The stats each policy's default normalization reads for state and action (its config's normalization_mapping;
# tests/test_check.py holds this table to the policies' configs).
POLICY_STATS: dict[str, tuple[str, ...]] = {"smolvla": ("mean", "std"), "pi0": ("mean", "std"), "pi05": ("q01", "q99")}
CHECK_COMMAND = "finetune-check"


@dataclass(frozen=True)
class Finding:
    level: str
    """error (training would fail or learn from wrong data) or warning (works here; worth a look)."""
    check: str
    where: str
    problem: str
    fix: str

    def line(self) -> str:
        return f"{self.where}: {self.problem}; {self.fix}"


@dataclass
class _Episode:
    """Where one episode lives, whatever the version."""

    index: int
    length: int
    data_file: Path
    rows: tuple[int, int] | None  # v3: dataset_from_index, dataset_to_index; v2.x: the whole file
    videos: dict[str, tuple[Path, float]]  # camera -> (file, from_timestamp)
    tasks: list[str] = field(default_factory=list)


@dataclass
class _Dataset:
    root: Path
    version: str
    info: dict
    features: dict[str, dict]
    fps: float
    tasks: list[str | None]  # by task_index (None: a gap)
    episodes: list[_Episode]
    stats: dict[str, dict[str, np.ndarray]] | None
    stats_where: str

    @property
    def legacy(self) -> bool:
        return self.version in LEGACY_VERSIONS

    def stats_fix(self, verb: str = "recompute", missing_only: bool = False) -> str:
        if self.legacy:
            return (f"{verb} them on its v3.0 conversion: `{CONVERT_COMMAND} {self.root}`, then `finetune-stats` on "
                    "the converted folder (which training can read)")
        return f"{verb} them with `finetune-stats {self.root}" + (" --missing-only`" if missing_only else "`")


class _Findings(list):
    def add(self, level: str, check: str, where: str, problem: str, fix: str) -> None:
        self.append(Finding(level, check, where, problem, fix))


# --- the two checks of frames against time ----------------------------------------------------------------------------

def check_timestamp_sync(timestamps: np.ndarray, fps: float, tolerance_s: float = TOLERANCE_S) -> str | None:
    """One episode's parquet timestamps against 1/fps (LeRobot's check_timestamps_sync): the first bad step, or None.
    """
    if len(timestamps) and abs(float(timestamps[0])) > tolerance_s:
        return f"its first timestamp is {float(timestamps[0]):.4f} s, not 0"
    steps = np.diff(np.asarray(timestamps, np.float64))
    bad = np.flatnonzero(np.abs(steps - 1 / fps) > tolerance_s)
    if not len(bad):
        return None
    i = int(bad[0])
    return (f"timestamps step by {steps[i]:.4f} s between frames {i} and {i + 1} (1/fps = {1 / fps:.4f} s, "
            f"tolerance {tolerance_s:g} s; {len(bad)} such step(s))")


def check_random_frames(path: Path, times: Sequence[float], tolerance_s: float, frame_tolerance_s: float
                        ) -> list[tuple[str, str, np.ndarray | None]]:
    """Decode the frames of `path` nearest each time, by random access through the reader training uses (so a file
    this passes does not fail mid-training: B-frames and open GOPs included). Per time: (level, problem or '',
    frame): an error when no frame decodes or the nearest is further than `frame_tolerance_s`, a warning past
    `tolerance_s` (LeRobot's limit)."""
    out: list[tuple[str, str, np.ndarray | None]] = []
    reader = VideoFrameReader(cache_bytes=0)
    try:
        for t in times:
            try:
                frame = reader.frame_at(path, t, tolerance_s)
                out.append(("", "", frame))
                continue
            except FrameNotFound as err:
                nearest = err.nearest
            except (av.FFmpegError, OSError) as e:
                out.append((ERROR, f"decoding the frame at t={t:.4f} s fails ({e})", None))
                continue
            if nearest is None:
                out.append((ERROR, f"no frame decodes at t={t:.4f} s", None))
            elif abs(nearest - t) > frame_tolerance_s:
                out.append((ERROR, f"no frame near t={t:.4f} s (nearest at {nearest:.4f} s)", None))
            else:
                out.append((WARNING, f"the frame for t={t:.4f} s is at {nearest:.4f} s, off by more than LeRobot's "
                                     f"{tolerance_s:g} s", reader.frame_at(path, t, frame_tolerance_s)))
    finally:
        reader.close()
    return out


# --- loading, whatever the version ------------------------------------------------------------------------------------

def _load(root: Path, found: _Findings) -> _Dataset | None:
    info_path = root / "meta/info.json"
    if not info_path.is_file():
        found.add(ERROR, "layout", str(info_path), "not found",
                  "point to the root of a LeRobotDataset folder (the one holding meta/, data/, videos/)")
        return None
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        found.add(ERROR, "layout", str(info_path), f"invalid JSON ({e})", "restore the file from the dataset's source")
        return None
    version = str(info.get("codebase_version", "")) if isinstance(info, dict) else ""
    if not version.startswith("v3") and version not in LEGACY_VERSIONS:
        found.add(ERROR, "version", str(info_path), f"codebase_version {version or 'missing'!r} is not supported",
                  "convert it with LeRobot's tools to v2.1 or v3.0 (v2.1 / v2.0 are read here)")
        return None
    try:
        check_info(info, info_path)
        if version in LEGACY_VERSIONS:
            legacy = load_legacy(root)
            info = legacy.info
            episodes = [_Episode(ep["episode_index"], ep["length"], legacy.data_file(ep["episode_index"]), None,
                                 {k: (legacy.video_file(ep["episode_index"], k), 0.0) for k in legacy.video_keys},
                                 list(ep.get("tasks") or [])) for ep in legacy.episodes]
            tasks: list[str | None] = [None] * (max(legacy.tasks, default=-1) + 1)
            for i, text in legacy.tasks.items():
                tasks[i] = text
        else:
            for name in ("fps", "features", "data_path"):
                if not info.get(name):
                    raise DatasetError(f"{info_path}: field {name!r} is missing or empty; every v3 info.json has it")
            tasks = list(v3._load_tasks(root))
            video_keys = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
            if video_keys and not info.get("video_path"):
                raise DatasetError(f"{info_path}: has video features but no 'video_path' template; add LeRobot's "
                                   "'videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4'")
            episodes = []
            for ep in v3._load_episodes(root, info):
                data = root / info["data_path"].format(chunk_index=ep["data/chunk_index"],
                                                       file_index=ep["data/file_index"])
                videos = {k: (root / info["video_path"].format(video_key=k, chunk_index=ep[f"videos/{k}/chunk_index"],
                                                               file_index=ep[f"videos/{k}/file_index"]),
                              float(ep[f"videos/{k}/from_timestamp"])) for k in video_keys}
                lo, hi = ep["dataset_from_index"], ep["dataset_to_index"]
                episodes.append(_Episode(ep["episode_index"], hi - lo, data, (lo, hi), videos,
                                         list(ep.get("tasks") or [])))
    except DatasetError as e:  # "<file>: <problem>; <fix>", as the readers word it
        problem, _, fix = str(e).partition("; ")
        found.add(ERROR, "layout", str(root / "meta"), problem, fix or "restore the metadata from the dataset's source")
        return None
    stats, stats_where = _load_stats(root, version, found)
    return _Dataset(root, version, info, info["features"], float(info["fps"]), tasks, episodes, stats, stats_where)


def _load_stats(root: Path, version: str, found: _Findings) -> tuple[dict | None, str]:
    per_episode = root / "meta/episodes_stats.jsonl"
    path = per_episode if version == "v2.1" and per_episode.is_file() else root / "meta/stats.json"
    if not path.is_file():
        return None, str(path)
    try:
        if path == per_episode:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            parts = [{k: {n: np.asarray(v, np.float64) for n, v in s.items()} for k, s in r["stats"].items()}
                     for r in rows]
            with np.errstate(all="ignore"):
                return aggregate_stats(parts), str(path)
        raw = json.loads(path.read_text())
        return {k: {n: np.asarray(v, np.float64) for n, v in s.items()} for k, s in raw.items()}, str(path)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        found.add(ERROR, "stats", str(path), f"cannot be read ({type(e).__name__}: {e})",
                  "recompute the stats (`finetune-stats DATASET`) or restore the file")
        return None, str(path)


# --- the checks -------------------------------------------------------------------------------------------------------

def _check_metadata(ds: _Dataset, found: _Findings) -> None:
    meta = str(ds.root / "meta")
    ids = [ep.index for ep in ds.episodes]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        found.add(ERROR, "episodes", meta, f"episode_index {twice[:5]} listed more than once",
                  "keep one row per episode in the episodes metadata")
    elif ids != list(range(len(ids))):
        gaps = sorted(set(range(max(ids) + 1)) - set(ids))
        found.add(WARNING, "episodes", meta, f"episode indices are not 0..{len(ids) - 1}: {len(gaps)} missing "
                  f"(first {gaps[:5]})", "fine here; LeRobot's tools expect them contiguous: renumber the episodes "
                  "(LeRobot's delete_episodes does) if you share the dataset")
    for ep in ds.episodes:
        if ep.length < 1:
            found.add(ERROR, "episodes", meta, f"episode {ep.index} has length {ep.length}",
                      "remove the empty episode from the metadata")
    total = sum(ep.length for ep in ds.episodes)
    for name, actual in (("total_episodes", len(ds.episodes)), ("total_frames", total),
                         ("total_tasks", sum(t is not None for t in ds.tasks))):
        if name in ds.info and ds.info[name] != actual:
            found.add(WARNING, "layout", str(ds.root / "meta/info.json"), f"{name} is {ds.info[name]} but the "
                      f"metadata lists {actual}", f"set {name} to {actual}")
    gaps = [i for i, t in enumerate(ds.tasks) if t is None]
    if gaps:
        found.add(ERROR, "tasks", meta, f"task_index {gaps[:5]} missing from the tasks table",
                  "number the tasks 0..N-1 without gaps")
    empty = [i for i, t in enumerate(ds.tasks) if t is not None and not t.strip()]
    if empty:
        found.add(WARNING, "tasks", meta, f"task_index {empty[:5]} has an empty instruction",
                  "write the instruction (the policy is conditioned on it)")
    known = {t for t in ds.tasks if t is not None}
    unknown = sorted({t for ep in ds.episodes for t in ep.tasks} - known)
    if unknown:
        found.add(WARNING, "tasks", meta, f"episodes name task(s) {unknown[:3]} absent from the tasks table",
                  "add them to the tasks table or fix the episodes' 'tasks'")
    for key, feature in ds.features.items():
        if "dtype" not in feature or "shape" not in feature:
            found.add(ERROR, "features", str(ds.root / "meta/info.json"), f"features[{key!r}] lacks 'dtype' or "
                      "'shape'", "add them (LeRobot's info.json has both for every feature)")


def _numeric(feature: dict) -> bool:
    return feature.get("dtype") not in (*CAMERA_DTYPES, "string", "language")


def _check_data(ds: _Dataset, found: _Findings, quick: bool, rng: np.random.Generator, samples: int,
                tolerance_s: float) -> None:
    """Every data file: columns against features, shapes, finite values, rows per episode, frame_index, index,
    timestamps and task_index."""
    by_file: dict[Path, list[_Episode]] = {}
    for ep in ds.episodes:
        by_file.setdefault(ep.data_file, []).append(ep)
    stored = [k for k, f in ds.features.items() if f.get("dtype") != "video" and "shape" in f]
    numeric = [k for k in stored if _numeric(ds.features[k]) and k not in INDEX_COLUMNS]
    images = [k for k in stored if ds.features[k].get("dtype") == "image"]
    # v2.x: the global index each episode should start at, in episode order
    starts = dict(zip([ep.index for ep in ds.episodes], np.cumsum([0] + [ep.length for ep in ds.episodes]).tolist()))
    for path, eps in by_file.items():
        where = str(path)
        if not path.is_file():
            found.add(ERROR, "layout", where, f"not found (episodes {[e.index for e in eps][:5]} are in it)",
                      "restore it from the dataset's source or remove its episodes from the metadata")
            continue
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as e:
            found.add(ERROR, "layout", where, f"cannot read parquet ({e})",
                      "the file is truncated or not parquet, restore it from the dataset's source")
            continue
        missing = [c for c in (*INDEX_COLUMNS, *stored) if c not in names]
        if missing:
            found.add(ERROR, "features", where, f"missing column(s) {missing} named in meta/info.json features",
                      "rewrite the file with them or remove the features from meta/info.json")
        extra = [c for c in names if c not in ds.features and c not in INDEX_COLUMNS]
        if extra:
            found.add(WARNING, "features", where, f"column(s) {extra} are not in meta/info.json features",
                      "ignored here; add them to features if a policy should read them")
        present = [c for c in (*INDEX_COLUMNS, *numeric) if c in names]
        table = pq.read_table(path, columns=present)
        columns: dict[str, np.ndarray] = {}
        for key in present:
            feature = ds.features.get(key, {"shape": [1]})
            kind = table.schema.field(key).type
            while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
                kind = kind.value_type
            integer = key in INDEX_COLUMNS and key != "timestamp"
            if not (pa.types.is_integer(kind) if integer else pa.types.is_integer(kind) or pa.types.is_floating(kind)
                    or pa.types.is_boolean(kind)) or table.column(key).null_count:
                what = f"{table.column(key).null_count} null(s)" if table.column(key).null_count else f"{kind} values"
                found.add(ERROR, "features", where, f"column {key!r} holds {what}, not "
                          + ("integers" if integer else "numbers"), "rewrite the column with the values it should "
                          "hold (see LeRobot's data files), or restore the file from the dataset's source")
                continue
            try:
                values = v3._column_to_numpy(table.column(key), key, {**feature, "shape": feature.get("shape", [1])},
                                             path)
            except (DatasetError, pa.ArrowException, ValueError) as e:
                found.add(ERROR, "features", where, str(e).removeprefix(f"{path}: ").split("; ")[0],
                          "fix the feature's shape in meta/info.json or rewrite the column")
                continue
            columns[key] = values.reshape(len(values), -1)
            if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
                rows = np.flatnonzero(~np.isfinite(columns[key]).all(1))
                episode = int(table.column("episode_index")[int(rows[0])].as_py()) if "episode_index" in names else "?"
                found.add(ERROR, "features", where, f"{key!r} holds NaN/inf in {len(rows)} row(s) (first: row "
                          f"{int(rows[0])}, episode {episode})", "repair or drop those rows (re-record the episode, "
                          "or leave it out with --dataset.episodes)")
        if not all(c in columns for c in INDEX_COLUMNS):
            continue
        episode_col = columns["episode_index"][:, 0]
        listed = {e.index for e in eps}
        strays = sorted(set(np.unique(episode_col).tolist()) - listed)
        if strays and eps[0].rows is None:  # v2.x: one episode per file
            found.add(ERROR, "episodes", where, f"holds rows of episode(s) {strays[:5]}, the file of episode "
                      f"{eps[0].index}", "rewrite the file with its own episode's rows only")
        for ep in eps:
            _check_episode(ds, ep, columns, episode_col, starts[ep.index], where, found, tolerance_s)
        bad = columns["task_index"][:, 0]
        bad = bad[(bad < 0) | (bad >= len(ds.tasks))]
        if len(bad):
            found.add(ERROR, "tasks", where, f"task_index {int(bad[0])} is not in the tasks table ({len(ds.tasks)} "
                      "tasks)", "add the task to the tasks table or fix the rows' task_index")
        if images and not quick:
            _check_image_cells(ds, path, images, rng, samples, found)


def _check_episode(ds: _Dataset, ep: _Episode, columns: dict[str, np.ndarray], episode_col: np.ndarray,
                   position: int, where: str, found: _Findings, tolerance_s: float) -> None:
    rows = np.flatnonzero(episode_col == ep.index)
    rows = rows[np.argsort(columns["frame_index"][rows, 0], kind="stable")]
    name = f"episode {ep.index}"
    if len(rows) != ep.length:
        found.add(ERROR, "episodes", where, f"{name} has {len(rows)} rows but its metadata says length {ep.length}",
                  "fix the episode's length in the metadata, or restore the missing rows")
        return
    frames = columns["frame_index"][rows, 0]
    if not np.array_equal(frames, np.arange(ep.length)):
        first = int(np.flatnonzero(frames != np.arange(ep.length))[0])
        found.add(ERROR, "episodes", where, f"{name}: frame_index is not 0..{ep.length - 1} (at row {first}: "
                  f"{int(frames[first])})", "renumber frame_index 0..length-1 in frame order")
    index = columns["index"][rows, 0]
    lo = ep.rows[0] if ep.rows is not None else position
    if not np.array_equal(index, np.arange(lo, lo + ep.length)):
        level, fix = ((ERROR, "regenerate the episodes metadata or the data file so they agree") if ep.rows is not None
                      else (WARNING, "fine here (the v3.0 conversion renumbers it); LeRobot's v2.1 reader expects it"))
        found.add(level, "episodes", where, f"{name}: 'index' is not {lo}..{lo + ep.length - 1} (found "
                  f"{int(index[0])}..{int(index[-1])})", fix)
    problem = check_timestamp_sync(columns["timestamp"][rows, 0], ds.fps, tolerance_s)
    if problem:
        found.add(ERROR, "timestamps", where, f"{name}: {problem}",
                  "the episode dropped or repeated frames: re-record it, leave it out with --dataset.episodes, or "
                  "fix its timestamps (frame_index / fps) if only they are wrong")


def _check_image_cells(ds: _Dataset, path: Path, keys: list[str], rng: np.random.Generator, samples: int,
                       found: _Findings) -> None:
    table = pq.read_table(path, columns=keys)
    for key in keys:
        expected = v3._hwc(ds.features[key])
        for row in sorted(rng.choice(table.num_rows, min(samples, table.num_rows), replace=False).tolist()):
            cell = table.column(key)[row].as_py() or {}
            try:
                source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else ds.root / str(cell.get("path"))
                with Image.open(source) as img:
                    shape = np.asarray(img.convert("RGB")).shape
            except (OSError, KeyError, TypeError, ValueError) as e:
                found.add(ERROR, "images", str(path), f"{key!r} row {row} does not decode ({type(e).__name__})",
                          "restore the file from the dataset's source")
                continue
            if shape != expected:
                found.add(ERROR, "images", str(path), f"{key!r} row {row} decodes to {shape}, meta/info.json says "
                          f"{tuple(ds.features[key]['shape'])}", "fix the feature's shape in meta/info.json")
                break


def _check_videos(ds: _Dataset, found: _Findings, rng: np.random.Generator, samples: int, tolerance_s: float
                  ) -> None:
    """Each video file: readable, at the dataset's fps, long enough for its episodes, random frames decoding at
    their episode's timestamps with the feature's shape."""
    frame_tolerance = 0.5 / ds.fps  # the reader's limit
    files: dict[tuple[str, Path], list[_Episode]] = {}
    for ep in ds.episodes:
        for key, (path, _) in ep.videos.items():
            files.setdefault((key, path), []).append(ep)
    for (key, path), eps in files.items():
        where = str(path)
        if not path.is_file():
            found.add(ERROR, "layout", where, f"not found ({key!r} of episodes {[e.index for e in eps][:5]})",
                      "restore it from the dataset's source")
            continue
        try:
            header = probe_video(path)
        except (av.FFmpegError, OSError) as e:
            found.add(ERROR, "video", where, f"cannot read video ({e})",
                      "the file is truncated or not an mp4, restore it from the dataset's source")
            continue
        if abs(header.fps - ds.fps) > 1e-3:
            found.add(ERROR, "video", where, f"{key!r} plays at {header.fps:g} fps, meta/info.json says {ds.fps:g}",
                      f"re-encode the video at {ds.fps:g} fps (or fix 'fps' in meta/info.json)")
        expected = v3._hwc(ds.features[key])
        if (header.height, header.width) != tuple(expected[:2]):
            found.add(ERROR, "video", where, f"{key!r} frames are {header.height}x{header.width}, meta/info.json "
                      f"features says {expected[0]}x{expected[1]}", "fix the feature's shape or re-encode the video")
        for ep in eps:
            start = ep.videos[key][1]
            needed = start + (ep.length - 1) / ds.fps
            if needed > header.last_time + frame_tolerance + 1e-6:
                found.add(ERROR, "timestamps", where, f"episode {ep.index} needs {key!r} frames up to t={needed:.3f} s "
                          f"but the video ends at {header.last_time:.3f} s", "re-encode the video or fix the episode's "
                          "from_timestamp / data rows")
        ends = np.cumsum([ep.length for ep in eps])  # distinct random frames of the file's episodes, in time order
        flat = np.sort(rng.choice(int(ends[-1]), min(samples, int(ends[-1])), replace=False))
        which = np.searchsorted(ends, flat, side="right")
        picks = [(eps[e], int(f - (ends[e - 1] if e else 0))) for e, f in zip(which.tolist(), flat.tolist())]
        times = [ep.videos[key][1] + frame / ds.fps for ep, frame in picks]
        for (ep, frame), t, (level, problem, image) in zip(picks, times,
                                                          check_random_frames(path, times, tolerance_s,
                                                                              frame_tolerance)):
            if problem:
                fix = ("re-encode the video from the source frames, or fix the episode's from_timestamp"
                       if image is not None else "the file is damaged: restore it from the dataset's source")
                found.add(level, "video", where, f"episode {ep.index} frame {frame} ({key!r}): {problem}", fix)
            if image is not None and image.shape != expected:
                found.add(ERROR, "video", where, f"{key!r} decodes to {image.shape}, meta/info.json says "
                          f"{tuple(ds.features[key]['shape'])}", "fix the feature's shape in meta/info.json")


def _check_stats(ds: _Dataset, found: _Findings, policies: Sequence[str], presence: bool) -> None:
    if ds.stats is None and not presence:
        return
    if ds.stats is None:
        found.add(ERROR if policies else WARNING, "stats", ds.stats_where, "no normalization stats",
                  ds.stats_fix("compute"))
        return
    for key, values in ds.stats.items():
        if key not in ds.features:
            found.add(WARNING, "stats", ds.stats_where, f"stats of {key!r}, which is not a feature",
                      "ignored; remove them or add the feature")
    cameras = [k for k, f in ds.features.items() if f.get("dtype") in CAMERA_DTYPES]
    vectors = [k for k, f in ds.features.items() if _numeric(f) and k not in BOOKKEEPING and "shape" in f]
    needed = {name for p in policies for name in POLICY_STATS[p]}
    for key in (*vectors, *cameras):
        values = ds.stats.get(key)
        core = key in ("observation.state", "action")
        if values is None and presence:
            found.add(ERROR if core else WARNING, "stats", ds.stats_where, f"no stats for {key!r}",
                      ds.stats_fix("compute", missing_only=True))
        if values is None:
            continue
        shape = (3, 1, 1) if key in cameras else tuple(ds.features[key]["shape"])
        for name, array in values.items():
            if name == "count":
                continue
            if not np.isfinite(array).all():
                found.add(ERROR, "stats", ds.stats_where, f"{key!r} {name!r} holds NaN/inf",
                          "normalization would turn every batch into NaN: " + ds.stats_fix())
            elif array.shape != shape and array.size != int(np.prod(shape)):
                found.add(ERROR, "stats", ds.stats_where, f"{key!r} {name!r} has shape {array.shape}, the feature "
                          f"{shape}", ds.stats_fix())
        std = values.get("std")
        if std is not None and np.isfinite(std).all():
            if (std < 0).any():
                found.add(ERROR, "stats", ds.stats_where, f"{key!r} std is negative at "
                          f"{np.flatnonzero(std.ravel() < 0).tolist()[:5]}", ds.stats_fix())
            elif (std == 0).any() and key not in cameras:
                found.add(WARNING, "stats", ds.stats_where, f"{key!r} std is 0 at dimension(s) "
                          f"{np.flatnonzero(std.ravel() == 0).tolist()[:8]} (constant in the data)",
                          "harmless if that dimension is truly constant (it normalizes to 0); otherwise "
                          + ds.stats_fix())
        for low, high in (("min", "max"), ("q01", "q99")):
            if low in values and high in values and values[low].shape == values[high].shape \
                    and (values[low] > values[high]).any():
                found.add(ERROR, "stats", ds.stats_where, f"{key!r} {low} > {high}", ds.stats_fix())
        if core and presence:
            lacking = [n for n in sorted(needed or set(QUANTILES) & {"q01", "q99"}) if n not in values]
            if lacking:
                who = ", ".join(p for p in policies if set(POLICY_STATS[p]) & set(lacking)) or "pi05"
                if ds.legacy and set(lacking) <= set(QUANTILES):  # the conversion adds them
                    found.add(WARNING, "stats", ds.stats_where, f"{key!r} lacks {lacking}, which {who} normalizes "
                              "with", f"none needed to train: the v3.0 conversion (training's, or `{CONVERT_COMMAND} "
                              f"{ds.root}`) computes them")
                else:
                    found.add(ERROR if needed else WARNING, "stats", ds.stats_where,
                              f"{key!r} lacks {lacking}, which {who} normalizes with",
                              ds.stats_fix("add", missing_only=True))


def check_dataset(root: str | Path, *, quick: bool = False, policies: Sequence[str] = (), samples: int = 3,
                  seed: int = 0, presence: bool = True, tolerance_s: float = TOLERANCE_S) -> list[Finding]:
    """Every finding about the dataset at `root` (errors first). `quick`: no video is opened and no image decoded;
    `policies`: the policy types whose normalization stats must be present; `samples`: random frames decoded per
    video file (and image cells per data file); `presence=False` leaves out absent stats (training checks those
    against its policy); `tolerance_s`: how far timestamps may be off 1/fps and frames off their timestamps."""
    unknown = [p for p in policies if p not in POLICY_STATS]
    if unknown:
        raise ValueError(f"unknown policy type(s) {unknown}; choose from {sorted(POLICY_STATS)}")
    found = _Findings()
    ds = _load(Path(root), found)
    if ds is not None:
        rng = np.random.default_rng(seed)
        _check_metadata(ds, found)
        _check_data(ds, found, quick, rng, samples, tolerance_s)
        if not quick:
            _check_videos(ds, found, rng, samples, tolerance_s)
        _check_stats(ds, found, policies, presence)
    return sorted(found, key=lambda f: f.level != ERROR)


def format_findings(root: str | Path, findings: Sequence[Finding]) -> str:
    """A table: level, check, file, problem and fix, then a summary line."""
    root = Path(root)
    errors = sum(f.level == ERROR for f in findings)
    lines = []
    if findings:
        rows = [(f.level.upper(), f.check, _relative(f.where, root), f.problem, f.fix) for f in findings]
        widths = [max(len(r[i]) for r in [("LEVEL", "CHECK", "WHERE", "", ""), *rows]) for i in range(3)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(("LEVEL", "CHECK", "WHERE"), widths)) + "  PROBLEM -> FIX")
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + f"  {row[3]} -> fix: {row[4]}")
    verdict = "not ready to train" if errors else "ready to train"
    lines.append(f"{root}: {errors} error(s), {len(findings) - errors} warning(s): {verdict}")
    return "\n".join(lines)


def _relative(where: str, root: Path) -> str:
    try:
        return str(Path(where).relative_to(root)) or "."
    except ValueError:
        return where


def check_for_training(root: str | Path, warn: Callable[[str], object] | None = None,
                       tolerance_s: float = TOLERANCE_S) -> None:
    """The quick checks at the start of a run: the first error raised as a DatasetError, warnings passed to `warn`
    (default: this module's logger)."""
    warn = warn or log.warning
    findings = check_dataset(root, quick=True, presence=False, tolerance_s=tolerance_s)
    errors = [f for f in findings if f.level == ERROR]
    if errors:
        more = f" (and {len(errors) - 1} more error(s): `{CHECK_COMMAND} {root}` lists them)" if len(errors) > 1 else ""
        raise DatasetError(errors[0].line() + more)
    for finding in findings:
        warn(f"warning: {finding.line()}")


@dataclass(frozen=True)
class CheckConfig:
    datasets: Annotated[tuple[str, ...], tyro.conf.Positional]
    """LeRobotDataset folders (v3.0, v2.1 or v2.0)."""
    policy: tuple[Literal["smolvla", "pi0", "pi05"], ...] = ()
    """Policy types to train: their normalization stats must be present (pi05 needs q01/q99)."""
    samples: int = 3
    """Random frames decoded per video file (and image cells per data file)."""
    seed: int = 0
    """Seed of the random frame choice."""
    quick: bool = False
    """Skip opening videos and decoding images (what training runs at start)."""
    tolerance_s: float = TOLERANCE_S
    """How far timestamps may be off 1/fps, and decoded frames off their timestamps (LeRobot's tolerance_s)."""


def main(argv: list[str] | None = None) -> int:
    cfg = tyro.cli(CheckConfig, args=argv, description="Check LeRobot datasets before training on them.")
    status = 0
    for root in cfg.datasets:
        findings = check_dataset(root, quick=cfg.quick, policies=cfg.policy, samples=cfg.samples, seed=cfg.seed,
                                 tolerance_s=cfg.tolerance_s)
        print(format_findings(root, findings))
        status = max(status, int(any(f.level == ERROR for f in findings)))
    return status


def cli() -> None:
    """Console-script entry point: exit status 1 when any dataset has an error."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
