"""Data loading throughput on a realistic video dataset: samples/s and frames decoded per sample.

    PYTHONPATH=. python bench/dataloader.py [--root /tmp/finetune_bench_video] [--workers 0 1 2 4] [--samples 160]

Generates (once, reused when present) a LeRobotDataset v3.0 with 2 cameras at 480x640, 30 fps, AV1 encoded as LeRobot
encodes (libsvtav1, g=2, crf=30, yuv420p), natural-looking moving content (a multi-octave textured scene panning
under a moving object), episodes of 300-900 frames, several episodes per video file, files both smaller and larger
than the cache. Then reads random samples (the training sampler's order, batch 8) through a DataLoader with 0, 1, 2,
... workers, with:

- default: this repo's reader (seek + decode forward, byte-bounded LRU of frames, `--cache-mb`);
- cache-off: the same reader with the cache disabled (`video_cache_bytes=0`);
- old: the reader this repo had before (whole files decoded into an LRU when they fit the cache), kept here only
  for comparison and given fewer samples because it can take seconds per sample.

Prints a table with samples/s, samples/s per worker, frames decoded per sample, and the ratio to cache-off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.data import LeRobotDataset, decode_video, encode_video  # noqa: E402
from finetune.training.sampling import ResumableBatchSampler  # noqa: E402

CAMERAS = ("observation.images.front", "observation.images.wrist")
H, W, FPS = 480, 640, 30
# (episode lengths) per video file: at 480x640 a frame decodes to 0.88 MiB, so with --cache-mb 700 the 2-episode
# files (600-700 frames, 530-620 MiB) fit the cache alone but not together, and the 3-episode file (1500 frames,
# 1.3 GiB) never fits.
FILES = ((300, 330), (350, 320), (400, 900, 200))


def scene_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth, detailed color field (sum of upsampled noise octaves): decodes like camera footage, unlike flat
    synthetic colors."""
    out = torch.zeros(3, h, w)
    for octave in range(1, 7):
        cells = 2**octave
        noise = torch.from_numpy(rng.random((1, 3, cells, cells * w // h + 1), dtype=np.float32))
        out += torch.nn.functional.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0] / octave
    out = (out - out.min()) / (out.max() - out.min())
    return (out.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def episode_frames(rng: np.random.Generator, length: int, camera: int) -> np.ndarray:
    """A camera panning over a textured scene, with a gripper-like blob moving across it."""
    scene = scene_texture(rng, H + 160, W + 240)
    t = np.arange(length) / length
    phase = rng.random(2) * 2 * np.pi
    dy = ((np.sin(2 * np.pi * t + phase[0]) + 1) * 80).astype(int)
    dx = ((np.sin(2 * np.pi * t * (1 + camera) + phase[1]) + 1) * 120).astype(int)
    yy, xx = np.mgrid[0:H, 0:W]
    frames = np.empty((length, H, W, 3), np.uint8)
    for i in range(length):
        frame = scene[dy[i] : dy[i] + H, dx[i] : dx[i] + W].astype(np.int16)
        cy, cx = H * (0.3 + 0.4 * t[i]), W * (0.2 + 0.6 * (0.5 + 0.5 * np.sin(3 * np.pi * t[i])))
        blob = ((yy - cy) ** 2 / 60**2 + (xx - cx) ** 2 / 40**2) < 1
        frame[blob] = frame[blob] // 3 + 150
        frames[i] = np.clip(frame, 0, 255)
    return frames


def make_dataset(root: Path) -> Path:
    if (root / "meta/info.json").is_file():
        return root
    rng = np.random.default_rng(0)
    episodes, index, ep_no = [], 0, 0
    for file_no, lengths in enumerate(FILES):
        columns: dict[str, list] = {k: [] for k in ("state", "frame_index", "episode_index", "index", "timestamp")}
        videos: dict[str, list[np.ndarray]] = {c: [] for c in CAMERAS}
        start = 0.0
        for length in lengths:
            row = {"episode_index": ep_no, "length": length, "data/chunk_index": 0, "data/file_index": file_no,
                   "dataset_from_index": index, "dataset_to_index": index + length}
            for c, camera in enumerate(CAMERAS):
                videos[camera].append(episode_frames(rng, length, c))
                row |= {f"videos/{camera}/chunk_index": 0, f"videos/{camera}/file_index": file_no,
                        f"videos/{camera}/from_timestamp": start, f"videos/{camera}/to_timestamp": start + length / FPS}
            episodes.append(row)
            columns["state"].append(rng.standard_normal((length, 6)).cumsum(0).astype(np.float32) * 0.01)
            columns["frame_index"].append(np.arange(length))
            columns["episode_index"].append(np.full(length, ep_no))
            columns["index"].append(np.arange(index, index + length))
            columns["timestamp"].append((np.arange(length) / FPS).astype(np.float32))
            start += length / FPS
            index += length
            ep_no += 1
        state = np.concatenate(columns["state"])
        table = pa.table({
            "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.ravel()), 6),
            "action": pa.FixedSizeListArray.from_arrays(pa.array(np.roll(state, -1, 0).ravel()), 6),
            **{k: pa.array(np.concatenate(columns[k])) for k in ("timestamp", "frame_index", "episode_index", "index")},
            "task_index": pa.array(np.zeros(len(state), np.int64)),
        })
        path = root / f"data/chunk-000/file-{file_no:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        for camera in CAMERAS:
            print(f"encoding {camera} file {file_no} ({sum(lengths)} frames)", flush=True)
            encode_video(np.concatenate(videos[camera]), root / f"videos/{camera}/chunk-000/file-{file_no:03d}.mp4",
                         FPS)
    (root / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": [0], "task": ["pick the cube"]}), root / "meta/tasks.parquet")
    video = {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"]}
    vector = {"dtype": "float32", "shape": [6], "names": None}
    info = {"codebase_version": "v3.0", "fps": FPS, "total_episodes": ep_no, "total_frames": index,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": {**{c: video for c in CAMERAS}, "observation.state": vector, "action": vector}}
    (root / "meta/info.json").write_text(json.dumps(info, indent=2))
    stats = {k: {"mean": [0.0] * 6, "std": [1.0] * 6} for k in ("observation.state", "action")}
    (root / "meta/stats.json").write_text(json.dumps(stats))
    return root


class OldVideoFrameReader:
    """The reader before the frame cache (for comparison only): whole files decoded into an LRU when they fit
    `cache_bytes`, else seek and decode forward. Counts decoded frames."""

    def __init__(self, cache_bytes: int):
        self.cache_bytes, self.decoded_frames = cache_bytes, 0
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes, self._too_big, self._pid = 0, set(), os.getpid()
        self._containers: dict = {}

    def frame_at(self, path, t: float, tolerance: float) -> np.ndarray:
        key = str(path)
        if os.getpid() != self._pid:
            self._containers, self._pid = {}, os.getpid()
        if key not in self._cache and key not in self._too_big:
            with av.open(key) as c:
                s = c.streams.video[0]
                fits = 0 < s.frames * s.height * s.width * 3 <= self.cache_bytes
            if fits:
                frames, times = decode_video(key)
                self.decoded_frames += len(frames)
                self._cache[key] = (frames, times)
                self._bytes += frames.nbytes
                while self._bytes > self.cache_bytes and len(self._cache) > 1:
                    self._bytes -= self._cache.popitem(last=False)[1][0].nbytes
            else:
                self._too_big.add(key)
        if key in self._cache:
            self._cache.move_to_end(key)
            frames, times = self._cache[key]
            return frames[int(np.abs(times - t).argmin())]
        if key not in self._containers:
            self._containers[key] = av.open(key)
            self._containers[key].streams.video[0].thread_count = 1
        c = self._containers[key]
        s = c.streams.video[0]
        c.seek(max(int(t / s.time_base), 0), stream=s, backward=True, any_frame=False)
        best = None
        for frame in c.decode(s):
            self.decoded_frames += 1
            if best is None or abs(frame.time - t) < abs(best.time - t):
                best = frame
            if frame.time > t + tolerance:
                break
        return best.to_ndarray(format="rgb24")


class CountingDataset(LeRobotDataset):
    """Adds the frames this sample made its process decode and the CPU seconds it took (readable from workers)."""

    def __getitem__(self, i: int) -> dict:
        before, cpu = self._videos.decoded_frames, time.process_time()
        item = super().__getitem__(i)
        item["decoded_frames"] = self._videos.decoded_frames - before
        item["cpu_s"] = time.process_time() - cpu
        return item


def measure(root: Path, reader: str, workers: int, samples: int, cache_mb: int, batch: int) -> dict:
    cache = 0 if reader == "cache-off" else cache_mb << 20
    ds = CountingDataset(root, chunk_size=50, video_cache_bytes=cache, uint8_images=True)
    if reader == "old":
        ds._videos = OldVideoFrameReader(cache)
    sampler = ResumableBatchSampler(len(ds), batch, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                         persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
    it = iter(loader)
    # Warm-up, untimed: every worker starts (process start-up is not loading throughput) and, with the cache on,
    # fills it (first-touching the cache's memory costs ~1 ms of CPU per sample once; a run lives in the steady state
    # after it). The cache holds cache_mb / 0.88 frames and a sample decodes ~3 (2 cameras): ~cache_mb / 2.6 samples.
    fill = (cache_mb * 2**20 // (H * W * 3)) // 3 if cache else 0
    for _ in range(max(1, workers) * max(1, -(-fill // batch))):
        next(it)
    start, seen, decoded, cpu = time.perf_counter(), 0, 0, 0.0
    while seen < samples:
        b = next(it)
        seen += len(b["index"])
        decoded += int(b["decoded_frames"].sum())
        cpu += float(b["cpu_s"].sum())
    elapsed = time.perf_counter() - start
    del it, loader
    rate = seen / elapsed
    return {"reader": reader, "workers": workers, "samples": seen, "seconds": elapsed, "samples_s": rate,
            "per_worker": rate / max(1, workers), "decoded_per_sample": decoded / seen, "cpu_ms": 1000 * cpu / seen}


def interleaved(root: Path, samples: int, cache_mb: int, batch: int) -> dict[str, float]:
    """In one process, default and cache-off read the same batches alternately (default's cache filled first):
    load from other jobs then hits both alike, batch by batch. Returns samples/s of each."""
    readers = {"cache-off": CountingDataset(root, chunk_size=50, video_cache_bytes=0, uint8_images=True),
               "default": CountingDataset(root, chunk_size=50, video_cache_bytes=cache_mb << 20, uint8_images=True)}
    order = iter(ResumableBatchSampler(len(readers["default"]), batch, seed=1))
    fill = (cache_mb * 2**20 // (H * W * 3)) // 3
    for _ in range(-(-fill // batch)):
        for i in next(order):
            readers["default"][i]
    seconds = dict.fromkeys(readers, 0.0)
    for _ in range(samples // batch):
        indices = next(order)
        for name, ds in readers.items():
            start = time.perf_counter()
            torch.utils.data.default_collate([ds[i] for i in indices])
            seconds[name] += time.perf_counter() - start
    return {name: (samples // batch) * batch / t for name, t in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/finetune_bench_video")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--old-samples", type=int, default=8)
    parser.add_argument("--cache-mb", type=int, default=700)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating; the best is kept")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    root = make_dataset(Path(args.root))
    ds = LeRobotDataset(root, chunk_size=1, keys=["observation.state"])
    print(f"dataset {root}: {len(ds)} frames, {ds.meta.total_episodes} episodes, {len(FILES)} files per camera, "
          f"cameras {len(CAMERAS)} x {H}x{W} @ {FPS} fps; cache {args.cache_mb} MiB per process; "
          f"{os.cpu_count()} CPUs")
    rows = []
    for workers in args.workers:
        runs: dict[str, list[dict]] = {"cache-off": [], "default": []}
        for _ in range(args.repeats):  # alternating, so that load from other jobs hits both alike
            for reader in runs:
                runs[reader].append(measure(root, reader, workers, args.samples, args.cache_mb, args.batch))
                print(runs[reader][-1], flush=True)
        rows += [max(r, key=lambda m: m["samples_s"]) for r in runs.values()]
    paired = interleaved(root, args.samples * 2, args.cache_mb, args.batch)
    print(paired, flush=True)
    if args.old_samples:
        rows.append(measure(root, "old", 0, args.old_samples, args.cache_mb, args.batch))
        print(rows[-1], flush=True)
    base = {r["workers"]: r["samples_s"] for r in rows if r["reader"] == "cache-off"}
    print(f"\nbest of {args.repeats} runs per setting; CPU ms/sample is the loading process's CPU time per sample "
          "(2 camera frames), 1000 / it the samples/s one uncontended core would give")
    print(f"{'reader':<10} {'workers':>7} {'samples':>7} {'samples/s':>10} {'per worker':>10} {'CPU ms/sample':>13} "
          f"{'1 core cap.':>11} {'decoded/sample':>14} {'vs cache-off':>12}")
    for r in rows:
        print(f"{r['reader']:<10} {r['workers']:>7} {r['samples']:>7} {r['samples_s']:>10.1f} {r['per_worker']:>10.1f} "
              f"{r['cpu_ms']:>13.1f} {1000 / r['cpu_ms']:>11.1f} {r['decoded_per_sample']:>14.2f} "
              + (f"{r['samples_s'] / base[r['workers']]:>11.2f}x" if r["workers"] in base else f"{'-':>12}"))
    print(f"\nin one process, the same {args.samples * 2} samples read alternately batch by batch: cache-off "
          f"{paired['cache-off']:.1f} samples/s, default {paired['default']:.1f} samples/s "
          f"({paired['default'] / paired['cache-off']:.2f}x)")


if __name__ == "__main__":
    main()
