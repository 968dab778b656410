"""LeRobotDataset v2.1 / v2.0 folders: their layout, and their conversion to v3.0 (`finetune-convert`).

v2.x keeps one parquet file and one mp4 per episode (`data/chunk-000/episode_000000.parquet`,
`videos/chunk-000/<camera>/episode_000000.mp4`, each video starting at t=0) with meta/episodes.jsonl,
meta/tasks.jsonl and per-episode stats in meta/episodes_stats.jsonl (v2.1) or one meta/stats.json (v2.0).
The conversion writes v3.0 as LeRobot's `convert_dataset_v21_to_v30` does: episodes concatenated into data files of
at most `data_file_size_mb` and video files of at most `video_file_size_mb` (videos remuxed, never re-encoded, so every
decoded frame is the source's), each episode located by `videos/<key>/from_timestamp`; meta/episodes with the
per-episode stats as `stats/<feature>/<stat>` columns; meta/stats.json aggregated from the per-episode stats (v2.1)
or copied (v2.0), then given the quantiles (q01..q99) of the numeric features, which v2.x stats lack, as LeRobot's
`augment_dataset_quantile_stats` adds them. Unlike LeRobot it keeps the episode indices of meta/episodes.jsonl (gaps
included) and rewrites the `index` column to run 0..N-1 in episode order, which v3.0's dataset_from_index/to_index
need.

Training reads a v2.x folder through `ensure_v30`: converted once into `<dataset>_v30` beside it (or, when that
folder cannot be written, under the Hugging Face cache), reused while the source files are unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tyro

from finetune.data.lerobot_dataset import DatasetError
from finetune.data.stats import BOOKKEEPING, QUANTILES, aggregate_stats, compute_dataset_stats, to_json
from finetune.entry import console_script, exit_on

log = logging.getLogger(__name__)
LEGACY_VERSIONS = ("v2.0", "v2.1")
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
DATA_FILE_SIZE_MB = 100  # LeRobot's defaults
VIDEO_FILE_SIZE_MB = 200
SOURCE_RECORD = "meta/converted_from.json"
CONVERT_COMMAND = "finetune-convert"


# --- reading the v2.x layout ------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path} not found; a LeRobotDataset v2.x folder lists its episodes and tasks in "
                           "meta/episodes.jsonl and meta/tasks.jsonl: restore it from the dataset's source")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {number} is not JSON ({e}); restore the file") from e
    return rows


def dataset_version(root: Path) -> str:
    """codebase_version of meta/info.json ('' when absent)."""
    path = root / "meta/info.json"
    try:
        return str(json.loads(path.read_text()).get("codebase_version", ""))
    except (OSError, json.JSONDecodeError):
        return ""


def is_legacy(root: str | Path) -> bool:
    return dataset_version(Path(root)) in LEGACY_VERSIONS


@dataclass
class LegacyDataset:
    """A v2.x folder's metadata: info.json, episodes (sorted by index), tasks and per-episode stats."""

    root: Path
    info: dict
    episodes: list[dict]
    tasks: dict[int, str]
    episode_stats: dict[int, dict[str, dict[str, np.ndarray]]]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.info["features"].items() if f.get("dtype") == "video"]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, f in self.info["features"].items() if f.get("dtype") == "image"]

    def chunk(self, episode_index: int) -> int:
        return episode_index // int(self.info.get("chunks_size") or 1000)

    def data_file(self, episode_index: int) -> Path:
        return self.root / self.info["data_path"].format(episode_chunk=self.chunk(episode_index),
                                                         episode_index=episode_index)

    def video_file(self, episode_index: int, key: str) -> Path:
        return self.root / self.info["video_path"].format(episode_chunk=self.chunk(episode_index), video_key=key,
                                                          episode_index=episode_index)


def check_info(info: object, path: Path) -> None:
    """Refuse an info.json whose fields the readers rely on have the wrong type (one DatasetError naming the field)."""
    def bad(field: str, what: str) -> DatasetError:
        return DatasetError(f"{path}: {field} must be {what}; restore the file from the dataset's source")

    if not isinstance(info, dict):
        raise bad("the file", "a JSON object")
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not fps > 0:
        raise bad("'fps'", f"a positive number (found {fps!r})")
    for field in ("data_path", "video_path"):
        if info.get(field) is not None and not isinstance(info[field], str):
            raise bad(f"{field!r}", "a path template string")
    if "chunks_size" in info and (not isinstance(info["chunks_size"], int) or info["chunks_size"] < 1):
        raise bad("'chunks_size'", "a positive integer")
    features = info.get("features")
    if not isinstance(features, dict) or not features:
        raise bad("'features'", "an object of feature name -> {dtype, shape, names}")
    for key, feature in features.items():
        shape = feature.get("shape") if isinstance(feature, dict) else None
        if not isinstance(feature, dict) or not isinstance(feature.get("dtype"), str) or not isinstance(shape, list) \
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise bad(f"features[{key!r}]", "an object with a 'dtype' string and a 'shape' list of positive integers")
        if feature["dtype"] in ("video", "image") and len(shape) != 3:
            raise bad(f"features[{key!r}]['shape']", "3 sizes (height, width, channels) for a camera")


def load_legacy(root: str | Path) -> LegacyDataset:
    """Read and check the meta/ folder of a LeRobotDataset v2.0 / v2.1."""
    root = Path(root)
    info_path = root / "meta/info.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{info_path} not found; point to the root of a LeRobotDataset (with meta/)") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{info_path}: invalid JSON ({e})") from e
    check_info(info, info_path)
    if str(info.get("codebase_version")) not in LEGACY_VERSIONS:
        raise DatasetError(f"{info_path}: 'codebase_version' is {info.get('codebase_version')!r}, not one of "
                           f"{LEGACY_VERSIONS}")
    for field in ("fps", "features", "data_path"):
        if not info.get(field):
            raise DatasetError(f"{info_path}: field {field!r} is missing or empty; every v2.x info.json has it")
    if any(f.get("dtype") == "video" for f in info["features"].values()) and not info.get("video_path"):
        raise DatasetError(f"{info_path}: has video features but no 'video_path' template")
    episodes = read_jsonl(root / "meta/episodes.jsonl")
    for ep in episodes:
        if not isinstance(ep, dict) or not isinstance(ep.get("episode_index"), int) \
                or not isinstance(ep.get("length"), int):
            raise DatasetError(f"{root / 'meta/episodes.jsonl'}: row {ep} needs integer 'episode_index' and "
                               "'length'; restore the file from the dataset's source")
    episodes.sort(key=lambda e: e["episode_index"])
    if not episodes:
        raise DatasetError(f"{root / 'meta/episodes.jsonl'} lists no episode")
    try:
        tasks = {int(t["task_index"]): str(t["task"]) for t in read_jsonl(root / "meta/tasks.jsonl")}
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{root / 'meta/tasks.jsonl'}: a row lacks an integer 'task_index' or a 'task' ({e!r}); "
                           "restore the file from the dataset's source") from e
    stats: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    stats_path = root / "meta/episodes_stats.jsonl"
    if stats_path.is_file():  # v2.1; v2.0 has one meta/stats.json instead
        try:
            for row in read_jsonl(stats_path):
                stats[int(row["episode_index"])] = {k: {n: np.asarray(v, np.float64) for n, v in s.items()}
                                                    for k, s in row["stats"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DatasetError(f"{stats_path}: a row is not {{episode_index, stats: {{feature: {{stat: values}}}}}} "
                               f"({e!r}); restore the file from the dataset's source") from e
    return LegacyDataset(root, info, episodes, tasks, stats)


# --- conversion -------------------------------------------------------------------------------------------------------

def _groups(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive positions packed into groups of at most max_bytes (one item alone may exceed it)."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size < max_bytes:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


def _encoding(stream: av.video.stream.VideoStream) -> tuple:
    """What must match for two streams to be remuxed into one: codec, size, pixel format, codec headers."""
    ctx = stream.codec_context
    return ctx.name, ctx.width, ctx.height, ctx.pix_fmt, bytes(ctx.extradata or b"")


def concat_videos(paths: list[Path], dest: Path) -> list[float]:
    """Remux mp4 files (same codec and size) into one without re-encoding; each input's start time (s) in dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    starts: list[float] = []
    with av.open(str(dest), "w", format="mp4") as out:
        stream, time_base = None, None
        end = 0  # end of the output so far, in time_base units
        last_dts = None
        for path in paths:
            with av.open(str(path)) as src:
                source = src.streams.video[0]
                if stream is None:
                    stream, time_base = out.add_stream_from_template(source, opaque=True), source.time_base
                    encoding = _encoding(source)
                elif _encoding(source) != encoding:
                    raise DatasetError(f"{path} is encoded as {_encoding(source)[:3]}, unlike {paths[0]} "
                                       f"{encoding[:3]}: videos of one file must share codec, size and settings; "
                                       f"convert with `{CONVERT_COMMAND} DATASET --video-file-size-mb 0` (one video "
                                       "file per episode) and train on its output")
                scale = Fraction(source.time_base) / Fraction(time_base)
                origin = source.start_time or 0
                packets = [p for p in src.demux(source) if p.dts is not None]
                if not packets:
                    raise DatasetError(f"{path}: no video packets; the file is empty or truncated, restore it")
                first_dts = round((packets[0].dts - origin) * scale)
                rate = source.average_rate or source.guessed_rate  # for packets that carry no duration
                frame_ticks = round(1 / (Fraction(rate) * Fraction(time_base))) if rate else 1
                # a decoder that reorders frames starts dts below pts: shift so dts keeps increasing across files
                offset = end if last_dts is None else max(end, last_dts + 1 - first_dts)
                starts.append(float(offset * time_base))
                for packet in packets:
                    pts = offset + round((packet.pts - origin) * scale)
                    dts = offset + round((packet.dts - origin) * scale)
                    duration = round(packet.duration * scale) if packet.duration else frame_ticks
                    packet.pts, packet.dts, packet.time_base, packet.duration = pts, dts, time_base, duration
                    packet.stream = stream
                    end, last_dts = max(end, pts + duration), dts
                    out.mux(packet)
    return starts


def _read_episode_file(path: Path, root: Path, first: Path, reference: pa.Schema | None) -> pa.Table:
    """One episode's data file, refused unless readable and with the columns and types of the first one."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: cannot read parquet ({e}); the file is truncated or not parquet, restore it "
                           "from the dataset's source") from e
    if reference is not None and not table.schema.remove_metadata().equals(reference.remove_metadata()):
        theirs, ours = dict(zip(reference.names, reference.types)), dict(zip(table.schema.names, table.schema.types))
        differ = sorted(k for k in theirs.keys() | ours.keys() if str(theirs.get(k)) != str(ours.get(k)))
        shown = ", ".join(f"{k}: {ours.get(k, 'absent')} here, {theirs.get(k, 'absent')} in {first.name}"
                          for k in differ[:3])
        raise DatasetError(f"{path}: its columns differ from the dataset's first data file ({shown}); rewrite it "
                           f"with the same columns and types (`finetune-check {root}` lists every file)")
    return table


def _flat_stats(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, list]:
    return {f"stats/{key}/{name}": np.asarray(v).tolist() for key, values in stats.items()
            for name, v in values.items()}


def convert_to_v30(src: str | Path, dest: str | Path, data_file_size_mb: int = DATA_FILE_SIZE_MB,
                   video_file_size_mb: int = VIDEO_FILE_SIZE_MB, quantiles: bool = True) -> Path:
    """Write the v3.0 conversion of the v2.x dataset `src` into the new folder `dest` (see the module docstring);
    `quantiles`: add the quantiles v2.x stats lack (add_missing_quantiles)."""
    legacy = load_legacy(src)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise DatasetError(f"{dest} is not empty; pick a new folder for the converted dataset (or delete it)")
    chunks_size = int(legacy.info.get("chunks_size") or 1000)
    episodes = legacy.episodes
    rows: list[dict[str, Any]] = [{"episode_index": ep["episode_index"], "tasks": list(ep.get("tasks") or []),
                                   "length": ep["length"]} for ep in episodes]

    # data: whole episodes per file, `index` renumbered 0..N-1 in episode order
    files = [legacy.data_file(ep["episode_index"]) for ep in episodes]
    for path, ep in zip(files, episodes):
        if not path.is_file():
            raise DatasetError(f"{path} not found (episode {ep['episode_index']} of meta/episodes.jsonl, "
                               "info.json 'data_path'); restore it or remove the episode from meta/episodes.jsonl")
    total = 0
    reference: pa.Schema | None = None  # every episode file must have the first one's columns and types
    for n, group in enumerate(_groups([p.stat().st_size for p in files], data_file_size_mb << 20)):
        chunk, file = divmod(n, chunks_size)
        tables = []
        for i in group:
            table = _read_episode_file(files[i], legacy.root, files[0], reference)
            reference = reference or table.schema
            length = table.num_rows
            missing = [c for c in ("index", "episode_index", "frame_index", "timestamp", "task_index")
                       if c not in table.column_names]
            if missing:
                raise DatasetError(f"{files[i]}: missing column(s) {missing}; every LeRobot data file has them, "
                                   "restore the file from the dataset's source")
            index = pa.array(np.arange(total, total + length, dtype=np.int64))
            table = table.set_column(table.schema.get_field_index("index"), "index", index)
            rows[i] |= {"data/chunk_index": chunk, "data/file_index": file, "dataset_from_index": total,
                        "dataset_to_index": total + length}
            if length != episodes[i]["length"]:
                raise DatasetError(f"{files[i]}: {length} rows but meta/episodes.jsonl says episode "
                                   f"{episodes[i]['episode_index']} has length {episodes[i]['length']}; fix the "
                                   "length in meta/episodes.jsonl")
            total += length
            tables.append(table)
        out = dest / DATA_PATH.format(chunk_index=chunk, file_index=file)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(tables, promote_options="default"), out)

    # videos: remuxed, whole episodes per file
    for key in legacy.video_keys:
        videos = [legacy.video_file(ep["episode_index"], key) for ep in episodes]
        missing = [str(v) for v in videos if not v.is_file()]
        if missing:
            raise DatasetError(f"{missing[0]} not found ({len(missing)} video(s) of {key!r} missing); restore them "
                               "from the dataset's source")
        for n, group in enumerate(_groups([v.stat().st_size for v in videos], video_file_size_mb << 20)):
            chunk, file = divmod(n, chunks_size)
            out = dest / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
            try:
                starts = concat_videos([videos[i] for i in group], out)
            except (av.FFmpegError, OSError) as e:
                raise DatasetError(f"{key!r} videos of episodes {[episodes[i]['episode_index'] for i in group]}: "
                                   f"cannot remux ({e}); check them with `finetune-check {legacy.root}`") from e
            for i, start in zip(group, starts):
                rows[i] |= {f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                            f"videos/{key}/from_timestamp": start,
                            f"videos/{key}/to_timestamp": start + episodes[i]["length"] / float(legacy.info["fps"])}

    for row in rows:
        row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        row |= _flat_stats(legacy.episode_stats.get(row["episode_index"], {}))
    (dest / EPISODES_PATH).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), dest / EPISODES_PATH)
    ids = sorted(legacy.tasks)
    tasks = pa.table({"task_index": pa.array(ids, pa.int64()), "task": pa.array([legacy.tasks[i] for i in ids])})
    pq.write_table(tasks, dest / "meta/tasks.parquet")
    if legacy.episode_stats:
        stats = to_json(aggregate_stats([legacy.episode_stats[e] for e in sorted(legacy.episode_stats)]))
        (dest / "meta/stats.json").write_text(json.dumps(stats, indent=4))
    elif (legacy.root / "meta/stats.json").is_file():
        shutil.copyfile(legacy.root / "meta/stats.json", dest / "meta/stats.json")

    info = dict(legacy.info)
    for stale in ("total_chunks", "total_videos"):
        info.pop(stale, None)
    fps = info["fps"]
    info |= {"codebase_version": "v3.0", "data_path": DATA_PATH,
             "video_path": VIDEO_PATH if legacy.video_keys else None,
             "data_files_size_in_mb": data_file_size_mb, "video_files_size_in_mb": video_file_size_mb,
             "total_episodes": len(episodes), "total_frames": total, "total_tasks": len(legacy.tasks),
             "features": {k: (f if f.get("dtype") == "video" else {**f, "fps": fps}) for k, f in
                          info["features"].items()}}
    (dest / "meta/info.json").write_text(json.dumps(info, indent=4))
    if quantiles:
        add_missing_quantiles(dest)
    return dest


def add_missing_quantiles(root: Path) -> list[str]:
    """Add q01..q99 of every numeric feature that lacks them to meta/stats.json (LeRobot's
    augment_dataset_quantile_stats does this for converted datasets: v2.x stats have no quantiles, pi0.5 normalizes
    with q01/q99); the other stats are kept. Returns the features completed."""
    path = root / "meta/stats.json"
    stats = json.loads(path.read_text()) if path.is_file() else {}
    features = json.loads((root / "meta/info.json").read_text())["features"]
    keys = [k for k, f in features.items() if f.get("dtype") not in ("video", "image", "string", "language")
            and k not in BOOKKEEPING and any(q not in stats.get(k, {}) for q in QUANTILES)]
    if not keys:
        return []
    computed = to_json(compute_dataset_stats(root, keys, progress=False))
    for key in keys:
        stats[key] = computed[key] | stats.get(key, {})  # quantiles added, the converted stats kept
    path.write_text(json.dumps(stats, indent=4))
    return keys


# --- convert on first use ---------------------------------------------------------------------------------------------

def source_fingerprint(root: Path) -> str:
    """Hash of the names, sizes and modification times of a dataset's files: changes when any file does."""
    digest = hashlib.sha256()
    for path in sorted(p for part in ("meta", "data", "videos") for p in (root / part).rglob("*") if p.is_file()):
        st = path.stat()
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_dir(root: Path) -> Path:
    """Where a v2.x dataset's conversion goes: `<dataset>_v30` beside it, else under the Hugging Face cache."""
    root = root.resolve()
    in_hub_cache = any(part.startswith("datasets--") for part in root.parts)  # never write into a Hub snapshot
    if os.access(root.parent, os.W_OK) and not in_hub_cache:
        return root.parent / f"{root.name}_v30"
    home = Path(os.environ.get("HF_LEROBOT_HOME") or Path(os.environ.get("HF_HOME") or "~/.cache/huggingface")
                / "lerobot").expanduser()
    return home / "converted" / f"{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:10]}_v30"


def _is_current(dest: Path, fingerprint: str) -> bool:
    try:
        record = json.loads((dest / SOURCE_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return record.get("fingerprint") == fingerprint


def ensure_v30(root: str | Path) -> Path:
    """`root` itself unless it is a v2.x dataset; then its v3.0 conversion (made once, under a file lock so that the
    ranks of a distributed run convert it once, and redone when a source file changed)."""
    root = Path(root)
    if not is_legacy(root):
        return root
    dest = cache_dir(root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = source_fingerprint(root)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current(dest, fingerprint):
            return dest
        log.info(f"{root} is LeRobotDataset {dataset_version(root)}: converting it to v3.0 in {dest} (once; reused "
                 f"while the source is unchanged, or convert it yourself with `{CONVERT_COMMAND} {root}`)")
        tmp = dest.parent / f".{dest.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert_to_v30(root, tmp)
            (tmp / SOURCE_RECORD).write_text(json.dumps({"source": str(root.resolve()), "fingerprint": fingerprint,
                                                         "codebase_version": dataset_version(root)}, indent=4))
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --- finetune-convert -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvertConfig:
    dataset: Annotated[str, tyro.conf.Positional]
    """LeRobotDataset v2.1 (or v2.0) folder to convert; it is left unchanged."""
    output: str | None = None
    """New folder for the v3.0 dataset (default: <dataset>_v30 beside it)."""
    data_file_size_mb: int = DATA_FILE_SIZE_MB
    """Largest data parquet file (whole episodes per file)."""
    video_file_size_mb: int = VIDEO_FILE_SIZE_MB
    """Largest video file (whole episodes per file, remuxed without re-encoding)."""


def main(argv: list[str] | None = None) -> Path:
    cfg = tyro.cli(ConvertConfig, args=argv, description="Convert a LeRobotDataset v2.1 / v2.0 folder to v3.0.")
    src = Path(cfg.dataset)
    dest = Path(cfg.output) if cfg.output else src.resolve().parent / f"{src.resolve().name}_v30"
    with exit_on(DatasetError):
        if not is_legacy(src):
            version = dataset_version(src)
            raise DatasetError(f"{src / 'meta/info.json'}: codebase_version is {version or 'missing'!r}; "
                               f"{CONVERT_COMMAND} converts {' and '.join(LEGACY_VERSIONS)} datasets"
                               + (" (this one is v3: train on it directly)" if version.startswith("v3") else ""))
        convert_to_v30(src, dest, cfg.data_file_size_mb, cfg.video_file_size_mb)
    print(f"{dest}: LeRobotDataset v3.0 converted from {src} ({dataset_version(src)})")
    return dest


cli = console_script(main)


if __name__ == "__main__":
    cli()
