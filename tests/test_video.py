"""The frame reader's cache: bounded decoding per sample whatever the file sizes, exact frames, bounded bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.data import VideoFrameReader, decode_video, encode_video
from finetune.data.video import probe_video

FPS, FRAMES, H, W = 30, 90, 64, 96
FRAME_BYTES = H * W * 3


def moving_texture(n: int, seed: int) -> np.ndarray:
    """Smooth noise scrolling and brightening over time: content a codec cannot reduce to flat blocks."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (H // 8, W // 8, 3)).astype(np.float32)
    big = np.kron(base, np.ones((8, 8, 1), np.float32))
    yy, xx = np.mgrid[0:H, 0:W]
    frames = [np.roll(big, (i, 2 * i), (0, 1)) * 0.7 + 40 * np.sin((xx + 3 * i) / 9.0)[..., None]
              + (yy * 0.3)[..., None] + i for i in range(n)]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[tuple[Path, np.ndarray]]:
    root = tmp_path_factory.mktemp("videos")
    out = []
    for k in range(2):
        path = root / f"file-{k:03d}.mp4"
        encode_video(moving_texture(FRAMES, k), path, FPS)  # g=2, as LeRobot encodes
        out.append((path, decode_video(path)[0]))
    return out


def test_random_access_across_files_that_fit_the_cache_only_one_at_a_time(videos):
    # Each file decodes to FRAMES frames; the cache holds 1.5 files: both together never fit.
    cache = int(1.5 * FRAMES * FRAME_BYTES)
    reader = VideoFrameReader(cache_bytes=cache)
    rng = np.random.default_rng(0)
    samples = 300
    for _ in range(samples):
        k, j = int(rng.integers(2)), int(rng.integers(FRAMES))
        path, frames = videos[k]
        np.testing.assert_array_equal(reader.frame_at(path, j / FPS, 0.5 / FPS), frames[j])
        assert reader.cached_bytes <= cache
    # A keyframe every 2 frames: a miss decodes at most 2 frames, a hit none (a whole-file reader decodes 90).
    assert reader.decoded_frames <= 2 * samples
    assert reader.decoded_frames < samples  # and the cache serves part of the samples without decoding


def test_a_working_set_that_fits_is_decoded_once(videos):
    reader = VideoFrameReader(cache_bytes=3 * FRAMES * FRAME_BYTES)
    for path, frames in videos:  # sequential reads decode on without seeking: each frame once
        for j in range(FRAMES):
            np.testing.assert_array_equal(reader.frame_at(path, j / FPS, 0.5 / FPS), frames[j])
    assert reader.decoded_frames == 2 * FRAMES
    rng = np.random.default_rng(1)
    for _ in range(100):
        k, j = int(rng.integers(2)), int(rng.integers(FRAMES))
        np.testing.assert_array_equal(reader.frame_at(videos[k][0], j / FPS, 0.5 / FPS), videos[k][1][j])
    assert reader.decoded_frames == 2 * FRAMES


def test_no_cache_decodes_at_most_a_keyframe_interval(videos):
    reader = VideoFrameReader(cache_bytes=0)
    path, frames = videos[1]
    for j in (89, 3, 4, 50, 51, 0, 88):
        before = reader.decoded_frames
        np.testing.assert_array_equal(reader.frame_at(path, j / FPS, 0.5 / FPS), frames[j])
        assert 1 <= reader.decoded_frames - before <= 2
    assert reader.cached_bytes == 0


def test_probe_reads_the_header(videos):
    info = probe_video(videos[0][0])
    assert (info.fps, info.frames, info.height, info.width) == (FPS, FRAMES, H, W)
    assert info.last_time == pytest.approx((FRAMES - 1) / FPS, abs=1e-6)



def test_reader_used_before_fork_works_in_workers(videos):
    path, frames = videos[0]
    reader = VideoFrameReader(cache_bytes=FRAMES * FRAME_BYTES)
    reader.frame_at(path, 10 / FPS, 0.5 / FPS)  # the parent holds an open container and a decoder position

    class Frames(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.from_numpy(reader.frame_at(path, (11 + i) / FPS, 0.5 / FPS).copy())

    loader = torch.utils.data.DataLoader(Frames(), batch_size=4, num_workers=2,
                                         multiprocessing_context="fork")
    got = torch.cat(list(loader))
    np.testing.assert_array_equal(got.numpy(), frames[11:19])
    np.testing.assert_array_equal(reader.frame_at(path, 12 / FPS, 0.5 / FPS), frames[12])  # parent unharmed
