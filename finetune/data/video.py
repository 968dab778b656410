"""MP4 encode/decode with PyAV: an encoder with codec fallback and a per-process frame reader."""

from __future__ import annotations

import functools
import io
import os
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# AV1 like LeRobot; this PyAV build encodes it with libsvtav1 and decodes it with libdav1d.
DEFAULT_CODEC = "libsvtav1"
FALLBACK_CODECS = ("libx264", "mpeg4")

# Per-codec encoder options. g=2 (a keyframe every 2 frames) keeps seeks cheap, as LeRobot does.
_CODEC_OPTIONS: dict[str, dict[str, str]] = {
    # lp=1: one encoder thread. SVT-AV1 otherwise starts a pool per file sized to the machine, which is slower for
    # small frames and was seen to stall under heavy CPU contention.
    "libsvtav1": {"g": "2", "crf": "30", "preset": "10", "svtav1-params": "lp=1"},
    "libx264": {"g": "2", "crf": "23", "preset": "veryfast"},
    "mpeg4": {"g": "2"},
}


def _write(frames: np.ndarray, dest: str | Path | io.BytesIO, fps: float, codec: str) -> None:
    container = av.open(dest, mode="w", format="mp4")
    try:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = "yuv420p"
        stream.options = dict(_CODEC_OPTIONS.get(codec, {"g": "2"}))
        if codec == "mpeg4":
            stream.codec_context.qscale = 3  # mpeg4 has no crf; a fixed quantiser keeps quality up
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    finally:
        container.close()


@functools.cache
def codec_round_trips(codec: str) -> bool:
    """True when this PyAV build can both encode `codec` and decode what it wrote."""
    if codec == "libsvtav1":
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner to stderr at every encoder start
    try:
        av.codec.Codec(codec, "w")
        buf = io.BytesIO()
        _write(np.zeros((2, 16, 16, 3), np.uint8), buf, 10, codec)
        buf.seek(0)
        with av.open(buf) as container:
            return sum(1 for _ in container.decode(video=0)) == 2
    except Exception:
        return False


def encode_video(frames: np.ndarray, path: str | Path, fps: float, codec: str = DEFAULT_CODEC) -> str:
    """Write (T, H, W, 3) uint8 RGB frames to an mp4 (yuv420p); returns the encoder actually used.

    Falls back to libx264, then mpeg4, when `codec` cannot be encoded and decoded here.
    Frame i gets presentation time i / fps.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    for candidate in (codec, *[c for c in FALLBACK_CODECS if c != codec]):
        if codec_round_trips(candidate):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _write(frames, path, fps, candidate)
            return candidate
    raise RuntimeError(f"no usable video encoder among {codec!r} and {FALLBACK_CODECS} in this PyAV build")


def codec_name(encoder: str) -> str:
    """Format name of an encoder (libsvtav1 -> av1), as stored in info.json's video.codec."""
    return av.codec.Codec(encoder, "w").canonical_name


def decode_video(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a whole file: (N, H, W, 3) uint8 frames and their (N,) presentation times in seconds."""
    frames, times = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.time))
    return np.stack(frames), np.asarray(times, dtype=np.float64)


_FORK_ORPHANS: list = []


class VideoFrameReader:
    """Per-process frame lookup by time, for dataset `__getitem__`.

    Whole files that fit `cache_bytes` are decoded once into uint8 arrays (LRU over files); larger ones are
    read by seeking to the keyframe before the target and decoding forward. Containers are opened lazily
    and never pickled, and a reader that finds itself in a forked child drops the parent's containers
    (their file offsets are shared with the parent).
    """

    max_open_containers = 8

    def __init__(self, cache_bytes: int = 1 << 30):
        self.cache_bytes = int(cache_bytes)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0
        self._containers: OrderedDict[str, av.container.InputContainer] = OrderedDict()
        self._too_big: set[str] = set()

    def __getstate__(self) -> dict:
        return {"cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict) -> None:
        self.cache_bytes = state["cache_bytes"]
        self._reset()

    def close(self) -> None:
        for container in self._containers.values():
            container.close()
        self._containers.clear()

    def frame_at(self, path: str | Path, t: float, tolerance: float) -> np.ndarray:
        """The (H, W, 3) uint8 frame whose presentation time is nearest `t`, within `tolerance` seconds."""
        if os.getpid() != self._pid:
            # Containers inherited through fork share file offsets with the parent, and freeing a threaded
            # decoder whose threads did not survive the fork hangs: keep them referenced, never touch them.
            _FORK_ORPHANS.append(self._containers)
            self._containers = OrderedDict()
            self._pid = os.getpid()
        key = str(path)
        if key in self._cache:
            self._cache.move_to_end(key)
            frames, times = self._cache[key]
        elif key not in self._too_big and self._fits(key):
            frames, times = decode_video(key)
            self._remember(key, frames, times)
        else:
            return self._seek_frame(key, t, tolerance)
        j = int(np.clip(np.searchsorted(times, t), 1, len(times) - 1)) if len(times) > 1 else 0
        if len(times) > 1 and abs(times[j - 1] - t) <= abs(times[j] - t):
            j -= 1
        self._check(key, t, float(times[j]), tolerance)
        return frames[j]

    def _fits(self, key: str) -> bool:
        container = self._container(key)
        stream = container.streams.video[0]
        n = stream.frames
        if not n and stream.average_rate:
            seconds = stream.duration * stream.time_base if stream.duration else (container.duration or 0) / 1e6
            n = int(np.ceil(float(seconds) * float(stream.average_rate)))
        # An unknown length counts as too big: seeking is slower but bounded in memory.
        fits = 0 < n * stream.height * stream.width * 3 <= self.cache_bytes
        if not fits:
            self._too_big.add(key)
        return fits

    def _remember(self, key: str, frames: np.ndarray, times: np.ndarray) -> None:
        self._cache[key] = (frames, times)
        self._cached_bytes += frames.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, (old, _) = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        # The file is now in memory; its container is no longer needed.
        container = self._containers.pop(key, None)
        if container is not None:
            container.close()

    def _container(self, key: str) -> av.container.InputContainer:
        if key in self._containers:
            self._containers.move_to_end(key)
            return self._containers[key]
        container = av.open(key)
        # No decoder threads in containers kept open: cheaper per DataLoader worker, and safe to fork.
        container.streams.video[0].thread_count = 1
        self._containers[key] = container
        while len(self._containers) > self.max_open_containers:
            self._containers.popitem(last=False)[1].close()
        return container

    def _seek_frame(self, key: str, t: float, tolerance: float) -> np.ndarray:
        container = self._container(key)
        stream = container.streams.video[0]
        # backward=True lands on the last keyframe at or before the target.
        container.seek(max(int(t / stream.time_base), 0), stream=stream, backward=True, any_frame=False)
        best, best_time = None, None
        for frame in container.decode(stream):
            if best is None or abs(frame.time - t) < abs(best_time - t):
                best, best_time = frame, float(frame.time)
            if frame.time > t + tolerance:
                break
        if best is None:
            raise RuntimeError(f"{key}: no frame decoded after seeking to t={t:.4f}s")
        self._check(key, t, best_time, tolerance)
        return best.to_ndarray(format="rgb24")

    @staticmethod
    def _check(key: str, t: float, found: float, tolerance: float) -> None:
        if abs(found - t) > tolerance + 1e-6:
            raise RuntimeError(
                f"{key}: no frame within {tolerance:.4f}s of t={t:.4f}s (nearest is at {found:.4f}s); "
                "the episode's videos/<key>/from_timestamp or the frame timestamps do not match the video"
            )
