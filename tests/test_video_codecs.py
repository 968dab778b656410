"""Random access gives the frame a full sequential decode gives, for every codec and GOP structure PyAV encodes here:
B-frames (H.264, HEVC, MPEG-4 Part 2), open GOPs, long GOPs (AV1, VP9), a variable frame rate. Real files from real
encoders, 32x32 and 48 frames; a dataset of B-frame videos read through __getitem__ hundreds of times."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from finetune.data import DatasetError, LeRobotDataset, VideoFrameReader, decode_video
from finetune.data.video import probe_video
from finetune.data.writer import DatasetWriter, Episode

FRAMES, SIZE, FPS = 48, 32, 30
TOLERANCE = 1e-4  # LeRobot's tolerance_s: the frame found must be the one at that time, not a neighbour

# name -> (encoder, options, variable frame rate)
CASES: dict[str, tuple[str, dict[str, str], bool]] = {
    "h264-bframes": ("libx264", {"preset": "veryfast", "x264-params": "bframes=2:keyint=12:min-keyint=12:scenecut=0"},
                     False),
    "h264-open-gop": ("libx264", {"preset": "veryfast",
                                  "x264-params": "open-gop=1:bframes=3:keyint=12:min-keyint=12:scenecut=0"}, False),
    "h264-bframes-vfr": ("libx264", {"preset": "veryfast", "x264-params": "bframes=2:keyint=12:scenecut=0"}, True),
    "hevc-bframes": ("libx265", {"x265-params": "bframes=3:keyint=12:min-keyint=12:scenecut=0:no-open-gop=1:"
                                                "log-level=none"}, False),
    "hevc-open-gop": ("libx265", {"x265-params": "bframes=3:keyint=12:min-keyint=12:scenecut=0:open-gop=1:"
                                                 "log-level=none"}, False),
    "mpeg4-bframes": ("mpeg4", {"bf": "2", "g": "12"}, False),
    "mpeg4-bframes-vfr": ("mpeg4", {"bf": "2", "g": "12"}, True),
    "av1-svt-long-gop": ("libsvtav1", {"g": "240", "svtav1-params": "lp=1"}, False),
    "av1-aom-long-gop": ("libaom-av1", {"g": "240", "cpu-used": "8"}, False),
    "vp9-long-gop": ("libvpx-vp9", {"g": "240", "deadline": "realtime"}, False),
}
VFR_STEPS_MS = (25, 40, 33, 50, 20)  # frame durations cycled through: 20 to 50 ms


def texture(n: int, seed: int = 0) -> np.ndarray:
    """Blocks of noise scrolling and brightening: every frame differs from its neighbours."""
    rng = np.random.default_rng(seed)
    big = np.kron(rng.integers(0, 256, (SIZE // 4, SIZE // 4, 3)).astype(np.float32), np.ones((4, 4, 1)))
    return np.stack([np.clip(np.roll(big, (i, 2 * i), (0, 1)) * 0.8 + 2 * i, 0, 255) for i in range(n)]).astype(
        np.uint8)


def encode_with(frames: np.ndarray, path: Path, encoder: str, options: dict[str, str], fps: int = FPS,
                vfr: bool = False) -> None:
    """An mp4 from `encoder` with `options`; with `vfr`, frame durations cycle through VFR_STEPS_MS."""
    if encoder not in av.codecs_available:
        pytest.skip(f"encoder {encoder} is not in this PyAV build (av.codecs_available)")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = options
        if encoder == "mpeg4":
            stream.codec_context.qscale = 3
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        pts = np.cumsum([0, *(VFR_STEPS_MS * len(frames))])[: len(frames)]
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if vfr:
                frame.pts, frame.time_base = int(pts[i]), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def packets(path: Path) -> list[tuple[int, bool]]:
    """(presentation time stamp, keyframe) of each packet, in decode order."""
    with av.open(str(path)) as container:
        return [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.pts is not None]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict[str, Path]:
    return {"root": tmp_path_factory.mktemp("codecs")}


@pytest.mark.parametrize("case", CASES)
def test_random_access_matches_a_sequential_decode(encoded, case):
    encoder, options, vfr = CASES[case]
    path = encoded["root"] / f"{case}.mp4"
    encode_with(texture(FRAMES), path, encoder, options, vfr=vfr)
    frames, times = decode_video(path)
    assert len(frames) == FRAMES

    # The file has the structure the case is about.
    pts = [p for p, _ in packets(path)]
    keyframes = [i for i, (_, key) in enumerate(packets(path)) if key]
    if "bframes" in case or "open-gop" in case:
        assert any(b < a for a, b in zip(pts, pts[1:])), "no B-frames: decode order equals presentation order"
        assert len(keyframes) >= 3
    if case == "h264-open-gop":  # pictures decoded after a keyframe but shown before it
        assert any(pts[j] < pts[k] for k in keyframes[1:] for j in range(k + 1, len(pts)))
    if "long-gop" in case:
        assert keyframes == [0]
    gaps = np.round(np.diff(times) * 1000).astype(int)
    assert set(gaps.tolist()) == set(VFR_STEPS_MS) if vfr else set(gaps.tolist()) <= {33, 34}
    assert probe_video(path).last_time == pytest.approx(times[-1], abs=1e-6)

    # Every frame by random access, no cache: each seek starts from a keyframe.
    reader = VideoFrameReader(cache_bytes=0)
    for j in np.random.default_rng(0).permutation(FRAMES):
        np.testing.assert_array_equal(reader.frame_at(path, times[j], TOLERANCE), frames[j], err_msg=f"frame {j}")
    # finetune-check's frame sample decodes the same way: no false alarm on any of these files.
    from finetune.data.check import check_random_frames

    found = check_random_frames(path, [float(times[j]) for j in range(FRAMES)], TOLERANCE, 0.5 / FPS)
    assert [level for level, _, _ in found] == [""] * FRAMES
    np.testing.assert_array_equal(np.stack([frame for _, _, frame in found]), frames)
    # Random draws with a cache of 8 frames: hits, decode-on and seeks mixed.
    reader = VideoFrameReader(cache_bytes=8 * SIZE * SIZE * 3)
    for j in np.random.default_rng(1).integers(0, FRAMES, 150):
        np.testing.assert_array_equal(reader.frame_at(path, times[j], TOLERANCE), frames[j], err_msg=f"frame {j}")


def test_bframe_dataset_serves_hundreds_of_random_frames_exactly(tmp_path):
    # 6 episodes of 20-28 frames, 3 per file; the writer's videos re-encoded as MPEG-4 with 2 B-frames and a keyframe
    # every 12 frames (the structure that made 31 of 60 random frames fail before).
    writer = DatasetWriter(tmp_path / "ds", fps=FPS, robot_type="test", episodes_per_file=3, codec="mpeg4")
    lengths = [20, 28, 24, 21, 27, 22]
    for e, n in enumerate(lengths):
        writer.add(Episode(task="t", state=np.zeros((n, 2), np.float32), action=np.full((n, 2), e, np.float32),
                           frames={"observation.images.cam": texture(n, seed=e)}))
    root = writer.finish()
    videos = sorted(root.glob("videos/observation.images.cam/*/*.mp4"))
    for video in videos:
        encode_with(decode_video(video)[0], video, *CASES["mpeg4-bframes"][:2])
        pts = [p for p, _ in packets(video)]
        assert any(b < a for a, b in zip(pts, pts[1:]))
    decoded = {v.name: decode_video(v)[0] for v in videos}
    rows = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()

    ds = LeRobotDataset(root, chunk_size=4, uint8_images=True, video_cache_bytes=6 * SIZE * SIZE * 3)
    for i in np.random.default_rng(0).integers(0, len(ds), 400).tolist():
        item = ds[i]
        row = rows[item["episode_index"]]
        video = f"file-{row['videos/observation.images.cam/file_index']:03d}.mp4"
        at = round((row["videos/observation.images.cam/from_timestamp"] + item["timestamp"]) * FPS)
        expected = decoded[video][at]
        np.testing.assert_array_equal(item["observation.images.cam"].permute(1, 2, 0).numpy(), expected,
                                      err_msg=f"sample {i}")
    assert ds.check_video_frames(frames_per_file=None) == len(ds)  # every frame, as finetune-check would


def test_load_check_samples_a_frame_of_each_episode_in_a_file(tmp_path):
    writer = DatasetWriter(tmp_path / "ds", fps=FPS, robot_type="test", episodes_per_file=3, codec="mpeg4")
    for e in range(3):
        writer.add(Episode(task="t", state=np.zeros((10, 2), np.float32), action=np.zeros((10, 2), np.float32),
                           frames={"observation.images.cam": texture(10, seed=e)}))
    root = writer.finish()
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[1]["videos/observation.images.cam/from_timestamp"] += 0.4 / FPS  # episode 1 drifts by 0.4 frame
    pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    for seed in range(5):  # whichever rows are drawn, 3 per file come from the 3 episodes
        ds = LeRobotDataset(root, chunk_size=2, check_frames_per_file=0)
        with pytest.raises(DatasetError, match=r"of episode 1, frame \d+ .* 0.013333s from t="):
            ds.check_video_frames(3, seed=seed)


@pytest.mark.slow
def test_bframe_dataset_trains_hundreds_of_random_batches(policy_dir, dataset_root, tmp_path):
    """The synthetic dataset's videos re-encoded as MPEG-4 with 2 B-frames: 300 steps of batch 8 from 2 workers."""
    import shutil

    from helpers import train_args

    from finetune import train
    from finetune.training.metrics import read_metrics

    root = Path(shutil.copytree(dataset_root, tmp_path / "bframes"))
    for video in sorted(root.glob("videos/*/*/*.mp4")):
        encode_with(decode_video(video)[0], video, *CASES["mpeg4-bframes"][:2], fps=10)
        pts = [p for p, _ in packets(video)]
        assert any(b < a for a, b in zip(pts, pts[1:]))
    summary = train.main(train_args(policy_dir, root, tmp_path / "run", "--steps", "300", "--batch-size", "8",
                                    "--dataset.num-workers", "2", "--log-every", "50", "--checkpoint.every", "300",
                                    "--optim.decay-steps", "300"))
    assert Path(summary["checkpoint"]).name == "000300"
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "run/metrics.jsonl") if "train/loss" in m]
    assert len(losses) == 6 and np.isfinite(losses).all()
