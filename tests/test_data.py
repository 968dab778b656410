"""LeRobotDataset v3 reader, video helpers and the synthetic reach task, on real files."""

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from finetune.data import (
    COLORS,
    DatasetError,
    LeRobotDataset,
    VideoFrameReader,
    decode_video,
    encode_video,
    expert_action,
    is_success,
    load_dataset_meta,
    make_synthetic_dataset,
    render,
    sample_scene,
    step,
    synthetic_episode,
)

CAM = "observation.images.top"
COLORS_USED = ["red", "green", "blue"]
EPISODES, LENGTH = 6, 12


@pytest.fixture(scope="module")
def video_ds(tmp_path_factory) -> Path:
    # 4 episodes per file: the second video file starts mid-dataset, exercising from_timestamp offsets.
    root = tmp_path_factory.mktemp("data") / "video"
    return make_synthetic_dataset(
        root, num_episodes=EPISODES, target_colors=COLORS_USED, episode_length=LENGTH, episodes_per_file=4, seed=3
    )


@pytest.fixture(scope="module")
def image_ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "image"
    return make_synthetic_dataset(
        root, num_episodes=4, target_colors=COLORS_USED, episode_length=LENGTH, use_videos=False, seed=3
    )


def _data_table(root: Path, file_index: int = 0) -> pa.Table:
    return pq.read_table(root / f"data/chunk-000/file-{file_index:03d}.parquet")


def _all_images(root: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(c["bytes"]))) for c in _data_table(root).column(CAM).to_pylist()]


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


def test_video_dataset_reads_back(video_ds):
    ds = LeRobotDataset(video_ds, chunk_size=5)
    assert len(ds) == EPISODES * LENGTH == ds.meta.total_frames
    assert ds.meta.total_episodes == EPISODES and ds.meta.fps == 10
    assert ds.meta.video_keys == [CAM] and ds.meta.camera_keys == [CAM] and ds.meta.image_keys == []
    assert ds.meta.tasks == [f"move to the {c} ball" for c in COLORS_USED]
    assert ds.meta.info["features"][CAM]["info"]["video.pix_fmt"] == "yuv420p"

    item = ds[LENGTH + 3]
    assert item[CAM].shape == (3, 64, 64) and item[CAM].dtype == torch.float32
    assert 0.0 <= item[CAM].min() and item[CAM].max() <= 1.0
    assert item["observation.state"].shape == (2,) and item["observation.state"].dtype == torch.float32
    assert item["action"].shape == (5, 2) and item["action"].dtype == torch.float32
    assert item["action_is_pad"].dtype == torch.bool and not item["action_is_pad"].any()
    assert (item["episode_index"], item["frame_index"], item["index"]) == (1, 3, LENGTH + 3)
    assert item["timestamp"] == pytest.approx(0.3)
    for ep in range(EPISODES):
        assert ds[ep * LENGTH]["task"] == f"move to the {COLORS_USED[ep % 3]} ball"


def test_action_chunk_matches_parquet_and_clamps_at_episode_end(video_ds):
    ds = LeRobotDataset(video_ds, chunk_size=5)
    table = _data_table(video_ds)
    actions = np.asarray(table.column("action").to_pylist(), np.float32)
    states = np.asarray(table.column("observation.state").to_pylist(), np.float32)

    item = ds[LENGTH + 4]  # interior frame of episode 1
    np.testing.assert_array_equal(item["action"].numpy(), actions[LENGTH + 4 : LENGTH + 9])
    np.testing.assert_array_equal(item["observation.state"].numpy(), states[LENGTH + 4])

    end = 2 * LENGTH - 2  # two frames before episode 1 ends: 2 real actions, then 3 copies of the last
    item = ds[end]
    np.testing.assert_array_equal(item["action"][:2].numpy(), actions[end : end + 2])
    np.testing.assert_array_equal(item["action"][2:].numpy(), np.repeat(actions[end + 1 : end + 2], 3, axis=0))
    assert item["action_is_pad"].tolist() == [False, False, True, True, True]


def test_parquet_matches_the_expert_rollout(video_ds):
    table = _data_table(video_ds, file_index=1)  # episodes 4 and 5
    states = np.asarray(table.column("observation.state").to_pylist(), np.float32)
    scene, expected_states, expected_actions = synthetic_episode(3, 5, COLORS_USED[5 % 3], episode_length=LENGTH)
    np.testing.assert_array_equal(states[LENGTH:], expected_states)
    np.testing.assert_array_equal(np.asarray(table.column("action").to_pylist())[LENGTH:], expected_actions)
    assert scene.instruction == "move to the blue ball"


def test_decoded_frames_match_the_rendered_scene(video_ds):
    ds = LeRobotDataset(video_ds, chunk_size=1)
    scenes = {ep: synthetic_episode(3, ep, COLORS_USED[ep % 3], episode_length=LENGTH) for ep in (0, 5)}
    for ep, t in [(0, 0), (0, LENGTH - 1), (5, 0), (5, 7)]:
        scene, states, _ = scenes[ep]
        decoded = ds[ep * LENGTH + t][CAM].permute(1, 2, 0).numpy() * 255
        assert np.abs(decoded - render(scene, states[t], 64)).mean() < 8
    # A wrong from_timestamp would show another episode's scene: that must be far off.
    other, other_states, _ = scenes[0]
    decoded = ds[5 * LENGTH][CAM].permute(1, 2, 0).numpy() * 255
    assert np.abs(decoded - render(other, other_states[0], 64)).mean() > 10


def test_seek_path_matches_cached_path(video_ds):
    cached = LeRobotDataset(video_ds, chunk_size=1)
    seeking = LeRobotDataset(video_ds, chunk_size=1, video_cache_bytes=0)
    for i in [0, 7, LENGTH * 5 + 11, LENGTH * 4, 3]:
        torch.testing.assert_close(seeking[i][CAM], cached[i][CAM], atol=0, rtol=0)


def test_dataloader_workers(video_ds):
    ds = LeRobotDataset(video_ds, chunk_size=4)
    _ = ds[0]  # the parent's cache and containers must not leak into the workers
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    batch = next(iter(loader))
    assert batch[CAM].shape == (8, 3, 64, 64) and batch["action"].shape == (8, 4, 2)
    torch.testing.assert_close(batch[CAM][5], ds[5][CAM])
    assert batch["task"][0] == "move to the red ball"


def test_image_column_dataset(image_ds):
    ds = LeRobotDataset(image_ds, chunk_size=3)
    assert ds.meta.image_keys == [CAM] and ds.meta.video_keys == []
    assert len(ds) == 4 * LENGTH
    scene, states, _ = synthetic_episode(3, 2, "blue", episode_length=LENGTH)
    item = ds[2 * LENGTH + 6]
    assert item[CAM].shape == (3, 64, 64) and item[CAM].dtype == torch.float32
    # PNG is lossless: the frame is exactly the rendered one.
    np.testing.assert_array_equal((item[CAM].permute(1, 2, 0) * 255).round().byte().numpy(), render(scene, states[6]))
    assert item["task"] == "move to the blue ball"


def test_stats_match_the_data(video_ds, image_ds):
    meta = load_dataset_meta(video_ds)
    table = pa.concat_tables([_data_table(video_ds, 0), _data_table(video_ds, 1)])
    for key in ("observation.state", "action"):
        x = np.asarray(table.column(key).to_pylist(), np.float64)
        np.testing.assert_allclose(meta.stats[key]["mean"], x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(meta.stats[key]["std"], x.std(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(meta.stats[key]["min"], x.min(0))
        # LeRobot's 5000-bin histogram quantile: inside the bin of the value of rank ceil(0.5 n)
        bin_width = float((x.max(0) - x.min(0)).max()) / 5000
        ranked = np.sort(x, 0)[int(np.ceil(0.5 * len(x))) - 1]
        np.testing.assert_allclose(meta.stats[key]["q50"], ranked, rtol=1e-5, atol=bin_width + 1e-6)
        assert meta.stats[key]["count"].tolist() == [EPISODES * LENGTH]
    # Camera stats are per channel in [0, 1], shaped (3, 1, 1), computed from the rendered frames.
    frames = np.stack(_all_images(image_ds)) / 255.0
    cam = load_dataset_meta(image_ds).stats[CAM]
    assert cam["mean"].shape == (3, 1, 1)
    np.testing.assert_allclose(cam["mean"][:, 0, 0], frames.mean((0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(cam["std"][:, 0, 0], frames.std((0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(cam["max"][:, 0, 0], frames.max((0, 1, 2)), atol=1e-6)


def test_episode_subset(video_ds):
    ds = LeRobotDataset(video_ds, chunk_size=20, episodes=[4, 1])
    assert len(ds) == 2 * LENGTH
    assert [ds[0]["episode_index"], ds[LENGTH]["episode_index"]] == [1, 4]
    assert ds[LENGTH]["index"] == 4 * LENGTH and ds[LENGTH]["task"] == "move to the green ball"
    # The chunk of episode 1's first frame clamps at its own end, never reaching into episode 4.
    full = LeRobotDataset(video_ds, chunk_size=20)
    np.testing.assert_array_equal(ds[0]["action"].numpy(), full[LENGTH]["action"].numpy())
    assert ds[0]["action_is_pad"].sum() == 20 - LENGTH


def test_keys_subset(video_ds):
    ds = LeRobotDataset(video_ds, chunk_size=2, keys=["observation.state"])
    item = ds[0]
    assert CAM not in item and "action" not in item and "action_is_pad" not in item
    assert item["observation.state"].shape == (2,)


def test_tasks_in_pandas_index_column(video_ds, tmp_path):
    # LeRobot writes tasks.parquet from a DataFrame indexed by the task strings.
    root = _copy(video_ds, tmp_path)
    table = pa.table({"task_index": [1, 0, 2], "__index_level_0__": ["b", "a", "c"]})
    pq.write_table(table, root / "meta/tasks.parquet")
    assert load_dataset_meta(root).tasks == ["a", "b", "c"]


def test_error_missing_info(tmp_path):
    with pytest.raises(DatasetError, match=r"meta/info.json not found"):
        LeRobotDataset(tmp_path, chunk_size=2)


def test_error_old_codebase_version(video_ds, tmp_path):
    root = _copy(video_ds, tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = "v2.1"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"codebase_version.*'v2.1'.*v3"):
        load_dataset_meta(root)


def test_error_missing_data_file(video_ds, tmp_path):
    root = _copy(video_ds, tmp_path)
    missing = root / "data/chunk-000/file-001.parquet"
    missing.unlink()
    with pytest.raises(DatasetError, match=rf"{missing}.* not found.*data_path.*data/file_index'=1"):
        LeRobotDataset(root, chunk_size=2)
    # Episodes 0-3 live in file 0 and still load.
    assert len(LeRobotDataset(root, chunk_size=2, episodes=[0, 3])) == 2 * LENGTH


def test_error_missing_video_file(video_ds, tmp_path):
    root = _copy(video_ds, tmp_path)
    (root / f"videos/{CAM}/chunk-000/file-000.mp4").unlink()
    with pytest.raises(DatasetError, match=rf"file-000.mp4 not found.*videos/{CAM}/chunk_index"):
        LeRobotDataset(root, chunk_size=2)


def test_error_state_of_wrong_length(video_ds, tmp_path):
    root = _copy(video_ds, tmp_path)
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    states = np.asarray(table.column("observation.state").to_pylist(), np.float32)
    widened = np.concatenate([states, np.zeros((len(states), 1), np.float32)], axis=1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(widened.ravel()), 3)
    table = table.set_column(table.schema.get_field_index("observation.state"), "observation.state", column)
    pq.write_table(table, path)
    with pytest.raises(DatasetError, match=r"file-000.parquet: column 'observation.state'.*\(3,\).*\(2,\)"):
        LeRobotDataset(root, chunk_size=2)


def test_error_episode_rows_inconsistent(video_ds, tmp_path):
    root = _copy(video_ds, tmp_path)
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[2]["dataset_to_index"] += 1
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DatasetError, match=r"episode 2 has length=12 but dataset_to_index - dataset_from_index = 13"):
        load_dataset_meta(root)


def test_error_video_timestamps_off(video_ds, tmp_path):
    root = _copy(video_ds, tmp_path)
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[5][f"videos/{CAM}/from_timestamp"] = 100.0
    pq.write_table(pa.Table.from_pylist(rows), path)
    # Found when the dataset is built (the video's header says where it ends), not mid-run in a worker.
    with pytest.raises(DatasetError, match=r"file-001.mp4: episode 5 needs 'observation.images.top' frames up to "
                                           r"t=101.100s .*but the video ends at 2.300s \(24 frames at 10 fps\)"):
        LeRobotDataset(root, chunk_size=2)
    ds = LeRobotDataset(root, chunk_size=2, episodes=[4])
    assert ds[0][CAM].shape == (3, 64, 64)
    # A start before the video's first frame is caught at load too: frames are decoded there.
    rows[5][f"videos/{CAM}/from_timestamp"] = -1.0
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DatasetError, match=rf"copy: '{CAM}' of episode 5, frame \d+ \(parquet timestamp [\d.]+s \+ "
                                           rf"videos/{CAM}/from_timestamp -1.000000s\): the nearest frame of \S+/"
                                           r"file-001.mp4 is at 0.000000s, .* or relax --dataset.tolerance-s$"):
        LeRobotDataset(root, chunk_size=2, episodes=[5])
    # Without the load check, the same line comes from the read.
    with pytest.raises(DatasetError, match=rf"copy: '{CAM}' of episode 5, frame 0 \(parquet timestamp 0.000000s \+ "
                                           r"videos/\S+/from_timestamp -1.000000s\): the nearest frame of \S+/"
                                           r"file-001.mp4 is at 0.000000s, 1.000000s from t=-1.000000s"):
        LeRobotDataset(root, chunk_size=2, episodes=[5], check_frames_per_file=0)[0]


def test_error_unknown_key(video_ds):
    with pytest.raises(DatasetError, match=r"unknown key\(s\) \['observation.images.wrist'\].*observation.state"):
        LeRobotDataset(video_ds, chunk_size=2, keys=["observation.images.wrist", "action"])


def test_error_bad_episode_index(video_ds):
    with pytest.raises(DatasetError, match=r"episode\(s\) \[6\] not in the dataset; valid episode indices are 0..5"):
        LeRobotDataset(video_ds, chunk_size=2, episodes=[0, 6])


def test_video_round_trip(tmp_path):
    t, h, w = 8, 48, 64
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack(
        [np.stack([xx * 3 + 10 * i, yy * 4, np.full_like(xx, 128 + 8 * i)], -1) for i in range(t)]
    ).astype(np.uint8)
    codec = encode_video(frames, tmp_path / "a.mp4", fps=10)
    decoded, times = decode_video(tmp_path / "a.mp4")
    assert codec == "libsvtav1"
    assert decoded.shape == frames.shape
    np.testing.assert_allclose(times, np.arange(t) / 10, atol=1e-6)
    assert np.abs(decoded.astype(int) - frames).mean() < 8
    # An encoder this build lacks falls back to one that round-trips.
    assert encode_video(frames, tmp_path / "b.mp4", fps=10, codec="no_such_codec") == "libx264"
    reader = VideoFrameReader(cache_bytes=0)
    np.testing.assert_array_equal(
        reader.frame_at(tmp_path / "b.mp4", 0.52, tolerance=0.05), decode_video(tmp_path / "b.mp4")[0][5]
    )
    with pytest.raises(RuntimeError, match="no frame within"):
        reader.frame_at(tmp_path / "b.mp4", 2.0, tolerance=0.05)


def test_scene_and_dynamics():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng, "yellow")
        assert scene.target_color == "yellow" and len(set(scene.ball_colors)) == 3
        on_bins = np.isin(scene.ball_positions, [-0.75, -0.25, 0.25, 0.75])  # centers of a 4x4 grid of bins
        assert on_bins.all() and len({tuple(p) for p in scene.ball_positions.tolist()}) == 3
    scene = sample_scene(np.random.default_rng(1), "red", distractor_colors=["green", "cyan"])
    assert sorted(scene.ball_colors) == ["cyan", "green", "red"]
    np.testing.assert_allclose(step(np.array([0.95, 0.0]), np.array([0.5, -0.05])), [1.0, -0.05], atol=1e-6)
    img = render(scene, scene.agent_start, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    for color in scene.ball_colors:  # every ball is visible in its own color
        assert (img == COLORS[color]).all(-1).sum() > 40
    assert (img == 255).all(-1).sum() >= 8  # the white agent cross


def test_expert_solves_the_task():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng, list(COLORS)[seed % len(COLORS)])
        xy = scene.agent_start
        for _ in range(30):
            xy = step(xy, expert_action(scene, xy, rng))
        assert is_success(scene, xy), f"seed {seed}: ended {np.linalg.norm(xy - scene.target_position):.3f} away"
        assert np.abs(expert_action(scene, xy, rng)).max() < 0.02  # and it has settled


def test_synthetic_writer_is_deterministic(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", num_episodes=2, target_colors=["cyan"], episode_length=4, seed=7)
    b = make_synthetic_dataset(tmp_path / "b", num_episodes=2, target_colors=["cyan"], episode_length=4, seed=7)
    assert _data_table(a).equals(_data_table(b))
    assert load_dataset_meta(a).episodes == load_dataset_meta(b).episodes
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(a, num_episodes=1, target_colors=["cyan"])
    with pytest.raises(ValueError, match="unknown target colors"):
        make_synthetic_dataset(tmp_path / "c", num_episodes=1, target_colors=["magenta"])


# --- bad datasets through the training command: exit code 2, one line naming the file, the field and the fix -------


def _train_error(policy_dir, root: Path, tmp_path: Path, capsys) -> str:
    from helpers import train_args

    from finetune import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, root, tmp_path / "run", "--steps", "1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_train_refuses_a_truncated_parquet_file(policy_dir, dataset_root, tmp_path, capsys):
    root = _copy(dataset_root, tmp_path)
    _truncate(root / "data/chunk-000/file-001.parquet")
    line = _train_error(policy_dir, root, tmp_path, capsys)
    assert re.fullmatch(r"error: \S+/data/chunk-000/file-001\.parquet: cannot read parquet \(.+\); the file is "
                        r"truncated or not parquet, restore it from the dataset's source", line), line


def test_train_refuses_a_truncated_video(policy_dir, dataset_root, tmp_path, capsys):
    root = _copy(dataset_root, tmp_path)
    _truncate(root / f"videos/{CAM}/chunk-000/file-000.mp4")
    line = _train_error(policy_dir, root, tmp_path, capsys)
    assert re.fullmatch(rf"error: \S+/videos/{CAM}/chunk-000/file-000\.mp4: cannot read video \(.+\); the file is "
                        rf"truncated or not an mp4 \('{CAM}'\), restore it from the dataset's source", line), line


def test_train_refuses_parquet_longer_than_its_video(policy_dir, dataset_root, tmp_path, capsys):
    root = _copy(dataset_root, tmp_path)
    video = root / f"videos/{CAM}/chunk-000/file-002.mp4"  # episodes 8 and 9, 16 frames each at 10 fps
    frames, _ = decode_video(video)
    encode_video(frames[:20], video, fps=10)
    line = _train_error(policy_dir, root, tmp_path, capsys)
    assert re.fullmatch(rf"error: \S+/file-002\.mp4: episode 9 needs '{CAM}' frames up to t=3\.100s "
                        r"\(videos/\S+/from_timestamp 1\.600 \+ its last parquet timestamp 1\.500\) but the video "
                        r"ends at 1\.900s \(20 frames at 10 fps\): the parquet and video lengths disagree; .+",
                        line), line


@pytest.mark.parametrize(("key", "stat", "value", "word"), [("action", "std", float("nan"), "NaN"),
                                                            ("observation.state", "mean", float("inf"), "inf")])
def test_train_refuses_non_finite_stats(policy_dir, dataset_root, tmp_path, capsys, key, stat, value, word):
    root = _copy(dataset_root, tmp_path)
    stats = json.loads((root / "meta/stats.json").read_text())
    stats[key][stat][1] = value  # json writes NaN / Infinity, as a buggy stats script would
    (root / "meta/stats.json").write_text(json.dumps(stats))
    line = _train_error(policy_dir, root, tmp_path, capsys)
    assert re.fullmatch(rf"error: \S+/meta/stats\.json: '{key}' '{stat}' holds {word} \(at flat position 1\); "
                        r"normalization would turn every batch into NaN: recompute the stats .+", line), line


def test_parquet_timestamps_off_the_fps_grid_are_refused_at_load(video_ds, tmp_path):
    root = _copy(video_ds, tmp_path)
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    ts = table.column("timestamp").to_numpy().copy()
    drifted = (table.column("episode_index").to_numpy() == 2) & (table.column("frame_index").to_numpy() >= 5)
    ts[drifted] += np.float32(0.4 / 10)  # episode 2 from frame 5 on: 0.4 frame late (10 fps)
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp", pa.array(ts)), path)
    with pytest.raises(DatasetError) as err:
        LeRobotDataset(root, chunk_size=2)
    assert re.fullmatch(r"\S+/copy: episode 2, frame 5: parquet timestamp 0\.54000\ds is 0\.14000\ds after the "
                        r"previous frame's, not 1/fps = 0\.100000s \(off by 0\.04000\ds, over the 0\.0001s "
                        r"tolerance\): fix the data's timestamps, or relax --dataset.tolerance-s", str(err.value))
    # Relaxed, each drifted timestamp reads the frame nearest to it: its own.
    ds = LeRobotDataset(root, chunk_size=2, tolerance_s=0.05, uint8_images=True)
    frames, _ = decode_video(root / f"videos/{CAM}/chunk-000/file-000.mp4")
    for i in (2 * LENGTH + 4, 2 * LENGTH + 5, 2 * LENGTH + 11):
        np.testing.assert_array_equal(ds[i][CAM].permute(1, 2, 0).numpy(), frames[i])


def test_train_refuses_an_episode_half_a_frame_off_its_video_and_tolerance_relaxes_it(
        policy_dir, dataset_root, tmp_path, capsys):
    from helpers import train_args

    from finetune import train

    root = _copy(dataset_root, tmp_path)
    path = root / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[8][f"videos/{CAM}/from_timestamp"] += 0.4 / 10  # episode 8 (file-002, with episode 9): 0.4 frame late
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    line = _train_error(policy_dir, root, tmp_path, capsys)
    assert re.fullmatch(rf"error: \S+/copy: '{CAM}' of episode 8, frame \d+ \(parquet timestamp [\d.]+s \+ "
                        rf"videos/{CAM}/from_timestamp 0\.040000s\): the nearest frame of \S+/file-002\.mp4 is at "
                        r"[\d.]+s, 0\.040000s from t=[\d.]+s \(over the 0\.0001s tolerance\): the timestamps and the "
                        r"video disagree; fix the timestamps or from_timestamp, or relax --dataset.tolerance-s",
                        line), line
    summary = train.main(train_args(policy_dir, root, tmp_path / "relaxed", "--steps", "1",
                                    "--dataset.tolerance-s", "0.05"))
    assert Path(summary["checkpoint"]).name == "000001" and summary["trainable_params"] > 0


def test_image_cells_by_path_and_empty_cells(image_ds, tmp_path):
    root = _copy(image_ds, tmp_path)
    path = root / "data/chunk-000/file-000.parquet"
    table = _data_table(root)
    cells = table.column(CAM).to_pylist()
    expected = _all_images(root)
    (root / "images").mkdir()
    for i in (0, 5, 13):  # some frames as files next to the parquet, named by a relative 'path', as LeRobot allows
        Image.open(io.BytesIO(cells[i]["bytes"])).save(root / f"images/{i}.png")
        cells[i] = {"bytes": None, "path": f"images/{i}.png"}
    column = pa.array(cells, table.schema.field(CAM).type)
    pq.write_table(table.set_column(table.schema.get_field_index(CAM), CAM, column), path)
    ds = LeRobotDataset(root, chunk_size=2, uint8_images=True)
    for i in (0, 4, 5, 13):
        np.testing.assert_array_equal(ds[i][CAM].permute(1, 2, 0).numpy(), expected[i])
    cells[7] = {"bytes": b"", "path": None}
    column = pa.array(cells, table.schema.field(CAM).type)
    pq.write_table(table.set_column(table.schema.get_field_index(CAM), CAM, column), path)
    with pytest.raises(DatasetError, match=rf"file-000.parquet: image column '{CAM}' has a row with neither 'bytes' "
                                           r"nor 'path'"):
        LeRobotDataset(root, chunk_size=2)
