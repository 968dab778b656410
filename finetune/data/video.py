"""MP4 encode/decode with PyAV: an encoder with codec fallback and a per-process frame reader with a frame cache."""

from __future__ import annotations

import functools
import io
import itertools
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class VideoInfo:
    """What a file's header says: frame rate, frame count and the time of its last frame (seconds)."""

    fps: float
    frames: int
    last_time: float
    height: int
    width: int


def probe_video(path: str | Path) -> VideoInfo:
    """Read an mp4's header (no decoding); av.FFmpegError when the file is truncated or not a video."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise av.error.InvalidDataError(0, "no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        seconds = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
        frames = int(stream.frames) or round(seconds * fps)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        last = start + (frames - 1) / fps if fps and frames else start + seconds
        return VideoInfo(fps, frames, _last_frame_time(container, stream, last), stream.height, stream.width)


def _last_frame_time(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                     estimate: float) -> float:
    """The presentation time of the last frame, from the packets after the last keyframe (read, not decoded); the
    header's `estimate` where they cannot be read. Exact with a variable frame rate too."""
    try:
        container.seek(2**62, stream=stream, backward=True, any_frame=False)
        times = [p.pts for p in container.demux(stream) if p.pts is not None]
    except av.FFmpegError:
        return estimate
    return float(max(times) * stream.time_base) if times else estimate


def _near(tolerance: float, fps: float) -> float:
    """How close to t a frame must be for no other frame to be nearer: the tolerance, at most a quarter frame."""
    return min(tolerance, 0.25 / fps) if fps else tolerance


class FrameNotFound(RuntimeError):
    """No frame of `path` within `tolerance` seconds of `t`; `nearest` is the closest frame's time (None: none)."""

    def __init__(self, path: str, t: float, nearest: float | None, tolerance: float):
        self.path, self.t, self.nearest, self.tolerance = path, t, nearest, tolerance
        gap = f"nearest frame at {nearest:.6f}s, {abs(nearest - t):.6f}s away" if nearest is not None else "no frame"
        super().__init__(f"{path}: no frame within {tolerance:g}s of t={t:.6f}s ({gap})")

    @property
    def gap(self) -> float | None:
        return None if self.nearest is None else abs(self.nearest - self.t)


@dataclass
class _SeekStart:
    """The first packet read after a seek: the keyframe decoding starts from."""

    dts: int | None = None
    pts: int | None = None


def _frames_from(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                 start: _SeekStart) -> Iterator[av.VideoFrame]:
    """Decoded frames from the container's position on, in presentation order, recording the first packet in `start`.

    Frames shown before that keyframe (the leading pictures of an open GOP, which reference the GOP before it) are
    dropped: decoded from here they may be wrong.
    """
    for packet in container.demux(stream):
        if start.dts is None and packet.dts is not None:
            start.dts, start.pts = packet.dts, packet.pts
        for frame in packet.decode():
            if start.pts is not None and frame.pts is not None and frame.pts < start.pts:
                continue
            yield frame


@dataclass
class _OpenVideo:
    container: av.container.InputContainer
    stream: av.video.stream.VideoStream
    frames: Iterator[av.VideoFrame] | None = None  # the decoder, positioned after frame `last`
    last: int | None = None


class VideoFrameReader:
    """Per-process frame lookup by time, for dataset `__getitem__`.

    A frame not in the cache is reached by seeking to the last keyframe from which decoding reaches it (with
    B-frames or an open GOP, possibly the one before the keyframe the container's seek finds) and decoding forward
    (or, when it lies just after the last frame decoded from that file, by decoding on); every frame decoded on the
    way is kept in a byte-bounded LRU of single frames, so a sample costs at most about one keyframe interval of
    decoding whatever the file sizes, and a working set that fits the cache is decoded once. Containers are opened
    lazily and never pickled, and a reader that finds itself in a forked child drops the parent's containers (their
    file offsets are shared with the parent). `decoded_frames` counts the frames this process decoded.
    """

    max_open_containers = 8
    decode_on_window = 8  # frames: a miss this close after the last decoded frame decodes on instead of seeking

    def __init__(self, cache_bytes: int = 1 << 30, decoder_threads: int = 1):
        self.cache_bytes = int(cache_bytes)
        self.decoder_threads = int(decoder_threads)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cache: OrderedDict[tuple[str, int], tuple[float, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0
        self._open: OrderedDict[str, _OpenVideo] = OrderedDict()
        self._fps: dict[str, float] = {}
        self.decoded_frames = 0

    def __getstate__(self) -> dict:
        return {"cache_bytes": self.cache_bytes, "decoder_threads": self.decoder_threads}

    def __setstate__(self, state: dict) -> None:
        self.cache_bytes = state["cache_bytes"]
        self.decoder_threads = state.get("decoder_threads", 1)
        self._reset()

    def close(self) -> None:
        for video in self._open.values():
            video.container.close()
        self._open.clear()

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def frame_at(self, path: str | Path, t: float, tolerance: float) -> np.ndarray:
        """The (H, W, 3) uint8 frame whose presentation time is nearest `t`, within `tolerance` seconds."""
        if os.getpid() != self._pid:
            # Containers inherited through fork share file offsets with the parent, and freeing a threaded
            # decoder whose threads did not survive the fork hangs: keep them referenced, never touch them.
            _FORK_ORPHANS.append(self._open)
            self._open = OrderedDict()
            self._pid = os.getpid()
        key = str(path)
        fps = self._fps.get(key) or self._video(key) and self._fps[key]
        hit = self._cache.get((key, round(t * fps))) if fps else None
        if hit is not None and abs(hit[0] - t) <= tolerance + 1e-6:
            self._cache.move_to_end((key, round(t * fps)))
            return hit[1]
        return self._decode(key, t, tolerance)

    def _decode(self, key: str, t: float, tolerance: float) -> np.ndarray:
        video = self._video(key)
        fps = self._fps[key]
        target = round(t * fps) if fps else None
        if not (video.frames is not None and video.last is not None and target is not None
                and video.last < target <= video.last + self.decode_on_window):
            self._seek(key, video, t, tolerance)
        # Frames come in presentation order: the first one at or after t - near is the nearest to t (with VFR too,
        # as long as frames are more than 2 * near apart).
        near = _near(tolerance, fps)
        best: tuple[float, np.ndarray] | None = None
        for frame in video.frames or ():
            time = float(frame.time)
            image = frame.to_ndarray(format="rgb24")
            self.decoded_frames += 1
            video.last = round(time * fps) if fps else None
            if fps:
                self._remember((key, video.last), time, image)
            if best is None or abs(time - t) < abs(best[0] - t):
                best = (time, image)
            if time >= t - near - 1e-6:
                break
        else:
            video.frames = None  # the file ended
        if best is None:
            raise FrameNotFound(key, t, None, tolerance)
        if abs(best[0] - t) > tolerance + 1e-6:
            raise FrameNotFound(key, t, best[0], tolerance)
        return best[1]

    def _seek(self, key: str, video: _OpenVideo, t: float, tolerance: float) -> None:
        """Position the decoder on the last keyframe from which decoding reaches the frame at `t`.

        Containers seek by decode time: with B-frames (or an open GOP) the keyframe found can be shown after `t`
        (its decode time is before `t`, its presentation time after). Then the seek is redone from just before that
        keyframe's decode time, which lands on the keyframe before it, until the first frame shown is not after `t`
        or the file's first keyframe is reached.
        """
        stream = video.stream
        # Aim a quarter tolerance past t: t is a float32 timestamp that can sit a tick before its frame, and a target
        # below a keyframe's time would land on the keyframe before it (a whole interval decoded in vain).
        seek_to = round((t + 0.25 * tolerance) / stream.time_base)
        tried: set[int | None] = set()
        while True:
            video.container.seek(seek_to, stream=stream, backward=True, any_frame=False)
            start = _SeekStart()
            frames = _frames_from(video.container, stream, start)
            first = next(frames, None)
            video.frames, video.last = (frames if first is None else itertools.chain([first], frames)), None
            shown_after = first is not None and float(first.time) > t + _near(tolerance, self._fps[key]) + 1e-6
            if not shown_after or start.dts is None or start.dts in tried:
                return
            tried.add(start.dts)
            seek_to = start.dts - 1

    def _remember(self, key: tuple[str, int], time: float, image: np.ndarray) -> None:
        if image.nbytes > self.cache_bytes:
            return
        old = self._cache.pop(key, None)
        if old is not None:
            self._cached_bytes -= old[1].nbytes
        self._cache[key] = (time, image)
        self._cached_bytes += image.nbytes
        while self._cached_bytes > self.cache_bytes:
            _, (_, evicted) = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes

    def _video(self, key: str) -> _OpenVideo:
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        container = av.open(key)
        stream = container.streams.video[0]
        # One decoder thread by default: DataLoader workers already use the cores, and frame threading would delay
        # each frame after a seek.
        stream.thread_count = self.decoder_threads
        self._fps[key] = float(stream.average_rate or stream.guessed_rate or 0)
        self._open[key] = _OpenVideo(container, stream)
        while len(self._open) > self.max_open_containers:
            self._open.popitem(last=False)[1].container.close()
        return self._open[key]
