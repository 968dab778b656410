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

    PYTHONPATH=. python bench/dataloader.py --memory [--before-src DIR] [--workers 0 1 2 8] [--samples 800]

instead measures host memory: peak RSS and PSS summed over the main process and its DataLoader workers (psutil), and
the main process's RSS plus each worker's USS, while random samples are read from a smaller video dataset (240x320,
830 frames per camera) and the same frames as PNG image columns; each setting in a fresh process. With --before-src
(a checkout of older code, `git archive <commit> finetune | tar -x -C DIR`), "before" rows run that code with
its per-process 1024 MiB cache.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import av
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

# --src DIR (the memory bench's "before" runs): import the package from another checkout, e.g. the code before a change
# (`git archive <commit> finetune | tar -x -C DIR`).
sys.path.insert(0, sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else
                str(Path(__file__).resolve().parent.parent))

from finetune.data import LeRobotDataset, decode_video, encode_video  # noqa: E402
from finetune.training.sampling import ResumableBatchSampler  # noqa: E402

CAMERAS = ("observation.images.front", "observation.images.wrist")
H, W, FPS = 480, 640, 30
# (episode lengths) per video file: at 480x640 a frame decodes to 0.88 MiB, so with --cache-mb 700 the 2-episode
# files (600-700 frames, 530-620 MiB) fit the cache alone but not together, and the 3-episode file (1500 frames,
# 1.3 GiB) never fits.
FILES = ((300, 330), (350, 320), (400, 900, 200))
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
# The memory bench (--memory): 240x320 and a third of the frames, so that 8 workers can cycle through it on 2 cores.
MEMORY_H, MEMORY_W = 240, 320
MEMORY_FILES = ((100, 110), (120, 100), (130, 300, 70))
BEFORE_CACHE_MB = 1024  # the cache each loading process had before the node budget (--dataset.video-cache-mb)


def drain(it, samples: int) -> tuple[int, int, float, float]:
    """Batches until `samples` samples: (samples seen, frames decoded, decode CPU seconds, wall seconds)."""
    start, seen, decoded, cpu = time.perf_counter(), 0, 0, 0.0
    while seen < samples:
        b = next(it)
        seen += len(b["index"])
        decoded += int(b["decoded_frames"].sum())
        cpu += float(b["cpu_s"].sum())
    return seen, decoded, cpu, time.perf_counter() - start


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


def episode_frames(rng: np.random.Generator, length: int, camera: int, h: int = H, w: int = W) -> np.ndarray:
    """A camera panning over a textured scene, with a gripper-like blob moving across it."""
    scene = scene_texture(rng, h + h // 3, w + w * 3 // 8)
    t = np.arange(length) / length
    phase = rng.random(2) * 2 * np.pi
    dy = ((np.sin(2 * np.pi * t + phase[0]) + 1) * (h // 6)).astype(int)
    dx = ((np.sin(2 * np.pi * t * (1 + camera) + phase[1]) + 1) * (w * 3 // 16)).astype(int)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.empty((length, h, w, 3), np.uint8)
    for i in range(length):
        frame = scene[dy[i] : dy[i] + h, dx[i] : dx[i] + w].astype(np.int16)
        cy, cx = h * (0.3 + 0.4 * t[i]), w * (0.2 + 0.6 * (0.5 + 0.5 * np.sin(3 * np.pi * t[i])))
        blob = ((yy - cy) ** 2 / (h / 8) ** 2 + (xx - cx) ** 2 / (w / 16) ** 2) < 1
        frame[blob] = frame[blob] // 3 + 150
        frames[i] = np.clip(frame, 0, 255)
    return frames


def png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_dataset(root: Path, h: int = H, w: int = W, files: tuple[tuple[int, ...], ...] = FILES,
                 images: bool = False) -> Path:
    """The dataset described above (`h` x `w`, episodes `files`); with `images`, the frames are PNG bytes in image
    columns of the parquet files, as LeRobot's image datasets, instead of videos."""
    if (root / "meta/info.json").is_file():
        return root
    rng = np.random.default_rng(0)
    episodes, index, ep_no = [], 0, 0
    for file_no, lengths in enumerate(files):
        columns: dict[str, list] = {k: [] for k in ("state", "frame_index", "episode_index", "index", "timestamp")}
        videos: dict[str, list[np.ndarray]] = {c: [] for c in CAMERAS}
        start = 0.0
        for length in lengths:
            row = {"episode_index": ep_no, "length": length, "data/chunk_index": 0, "data/file_index": file_no,
                   "dataset_from_index": index, "dataset_to_index": index + length}
            for c, camera in enumerate(CAMERAS):
                videos[camera].append(episode_frames(rng, length, c, h, w))
                if not images:
                    row |= {f"videos/{camera}/chunk_index": 0, f"videos/{camera}/file_index": file_no,
                            f"videos/{camera}/from_timestamp": start,
                            f"videos/{camera}/to_timestamp": start + length / FPS}
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
        if images:
            for camera in CAMERAS:
                cells = [{"bytes": png(f), "path": None} for f in np.concatenate(videos[camera])]
                table = table.append_column(camera, pa.array(cells, pa.struct([("bytes", pa.binary()),
                                                                               ("path", pa.string())])))
        path = root / f"data/chunk-000/file-{file_no:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        for camera in CAMERAS if not images else ():
            print(f"encoding {camera} file {file_no} ({sum(lengths)} frames)", flush=True)
            encode_video(np.concatenate(videos[camera]), root / f"videos/{camera}/chunk-000/file-{file_no:03d}.mp4",
                         FPS)
    (root / "meta/episodes/chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": [0], "task": ["pick the cube"]}), root / "meta/tasks.parquet")
    video = {"dtype": "image" if images else "video", "shape": [h, w, 3], "names": ["height", "width", "channels"]}
    vector = {"dtype": "float32", "shape": [6], "names": None}
    info = {"codebase_version": "v3.0", "fps": FPS, "total_episodes": ep_no, "total_frames": index,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": None if images else VIDEO_PATH,
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
    seen, decoded, cpu, elapsed = drain(it, samples)
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


class PeakMemory:
    """Peak over time of the memory of this process and its children (DataLoader workers), sampled by a thread:
    - rss: RSS summed (each process's resident pages; pages shared by several processes counted in each);
    - pss: PSS summed (shared pages split among the processes sharing them);
    - footprint: this process's RSS plus each worker's USS (the pages only it holds): what the job holds in all."""

    def __init__(self, every_s: float = 0.05):
        self.rss = self.pss = self.footprint = 0
        self._every, self._stop = every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me, tick = psutil.Process(), 0
        while not self._stop.is_set():
            procs = [me, *me.children(recursive=True)]
            rss = pss = footprint = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    if tick % 5 == 0:
                        full = p.memory_full_info()
                        pss += full.pss
                        footprint += full.rss if p is me else full.uss
                except psutil.Error:  # a worker that just exited
                    pass
            self.rss = max(self.rss, rss)
            if tick % 5 == 0:
                self.pss, self.footprint = max(self.pss, pss), max(self.footprint, footprint)
            tick += 1
            self._stop.wait(self._every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cache_bytes(variant: str, workers: int, node_cache_mb: int | None) -> int:
    if variant == "before":
        return BEFORE_CACHE_MB << 20
    from finetune.data.workers import cache_bytes_per_process

    return cache_bytes_per_process(node_cache_mb, 1, workers)


def memory_run(root: Path, variant: str, workers: int, samples: int, batch: int, node_cache_mb: int | None) -> dict:
    """One setting, in this (fresh) process: peak RSS / PSS summed over it and its workers while `samples` random
    samples are read, and samples/s. `variant` "now": the node's default cache budget split across the loading
    processes; "before": BEFORE_CACHE_MB per process (run with --src pointing at the code before)."""
    idle = psutil.Process().memory_info().rss
    cache = cache_bytes(variant, workers, node_cache_mb)
    ds = CountingDataset(root, chunk_size=50, uint8_images=True, video_cache_bytes=cache)
    loaded = psutil.Process().memory_info().rss
    monitor = PeakMemory()
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ResumableBatchSampler(len(ds), batch, seed=0),
                                         num_workers=workers, persistent_workers=workers > 0,
                                         prefetch_factor=2 if workers else None)
    it = iter(loader)
    next(it)  # workers started
    seen, decoded, cpu, elapsed = drain(it, samples)
    monitor.stop()
    del it, loader
    return {"variant": variant, "workers": workers, "samples": seen, "samples_s": seen / elapsed,
            "decoded_per_sample": decoded / seen, "cpu_ms": 1000 * cpu / seen,
            "idle_mib": idle / 2**20, "loaded_mib": loaded / 2**20,
            "peak_rss_mib": monitor.rss / 2**20, "peak_pss_mib": monitor.pss / 2**20,
            "peak_footprint_mib": monitor.footprint / 2**20,
            "cache_mib_per_process": cache_bytes(variant, workers, node_cache_mb) / 2**20}


def memory_table(args: argparse.Namespace) -> None:
    """Each (dataset, variant, workers) in a fresh process, so that no run inherits another's memory."""
    roots = {kind: make_dataset(Path(f"{args.root}_memory_{kind}"), MEMORY_H, MEMORY_W, MEMORY_FILES,
                                images=kind == "image") for kind in args.datasets}
    print(f"node memory {psutil.virtual_memory().total / 2**30:.1f} GiB; {os.cpu_count()} CPUs; default cache "
          f"budget {cache_bytes('now', 0, None) / 2**20:.0f} MiB per node, used {args.node_cache_mb or 'default'}; "
          f"before: {args.before_src}", flush=True)
    rows = []
    for kind, root in roots.items():
        for variant in ("before", "now") if args.before_src else ("now",):
            for workers in args.workers:
                if variant == "before" and (workers not in args.before_workers or not args.before_src):
                    continue
                src = ["--src", args.before_src] if variant == "before" else []
                if args.node_cache_mb is not None:
                    src += ["--node-cache-mb", str(args.node_cache_mb)]
                out = subprocess.run([sys.executable, __file__, "--memory-run", str(root), variant, str(workers),
                                      "--samples", str(args.samples), "--batch", str(args.batch), *src],
                                     check=True, capture_output=True, text=True).stdout
                rows.append({"dataset": kind, **json.loads(out.strip().splitlines()[-1])})
                print(rows[-1], flush=True)
    one = {(r["dataset"], r["variant"]): r for r in rows if r["workers"] == 1}
    print("\nMiB, peaks while reading; (x) = vs 1 worker of the same dataset and variant")
    print("| dataset | variant | workers | cache MiB/process | summed RSS | summed PSS | main RSS + workers' USS "
          "| samples/s | CPU ms/sample | decoded/sample |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = one.get((r["dataset"], r["variant"]))

        def cell(key: str) -> str:
            return f"{r[key]:.0f}" + (f" ({r[key] / base[key]:.2f}x)" if base else "")

        print(f"| {r['dataset']} | {r['variant']} | {r['workers']} | {r['cache_mib_per_process']:.0f} | "
              f"{cell('peak_rss_mib')} | {cell('peak_pss_mib')} | {cell('peak_footprint_mib')} | "
              f"{r['samples_s']:.1f} | {r['cpu_ms']:.1f} | {r['decoded_per_sample']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/finetune_bench_video")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--old-samples", type=int, default=8)
    parser.add_argument("--cache-mb", type=int, default=700)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating; the best is kept")
    parser.add_argument("--memory", action="store_true",
                        help="instead: peak RSS / PSS summed over the loading processes, video and image datasets")
    parser.add_argument("--before-workers", type=int, nargs="*", default=[1, 8],
                        help="with --memory: worker counts also measured with the reader as it was before")
    parser.add_argument("--datasets", nargs="*", default=["video", "image"], choices=["video", "image"],
                        help="with --memory: which datasets")
    parser.add_argument("--node-cache-mb", type=int, help="with --memory: the node's cache budget (else training's)")
    parser.add_argument("--before-src", help="with --memory: a checkout of the code before, for the 'before' rows")
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--memory-run", nargs=3, metavar=("ROOT", "VARIANT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if args.memory_run:
        root, variant, workers = args.memory_run
        print(json.dumps(memory_run(Path(root), variant, int(workers), args.samples, args.batch, args.node_cache_mb)))
        return
    if args.memory:
        memory_table(args)
        return
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
