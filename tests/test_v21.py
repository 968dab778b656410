"""LeRobotDataset v2.1 / v2.0 (finetune.data.v21): conversion to v3.0 keeps every frame and value, training on a v2.1
folder converts it once and trains, evaluates and resumes exactly as on its v3.0 conversion."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import losses, train_args
from legacy_writer import write_legacy_dataset
from PIL import Image

from finetune import eval as evaluation
from finetune import train
from finetune.data import DatasetError, LeRobotDataset, decode_video, load_dataset_meta, make_synthetic_dataset
from finetune.data.multi import DataMix
from finetune.data.v21 import concat_videos, convert_to_v30, ensure_v30, main
from finetune.inference import predict
from finetune.training.metrics import read_metrics

CAMERA = "observation.images.top"


@pytest.fixture(scope="module")
def small_v3(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("v3") / "small", num_episodes=5,
                                  target_colors=["red", "blue"], episode_length=6, image_size=32, seed=3,
                                  episodes_per_file=2)


@pytest.fixture(scope="module")
def small_v21(small_v3, tmp_path_factory):
    return write_legacy_dataset(small_v3, tmp_path_factory.mktemp("v21") / "small")


def test_the_legacy_layout_is_refused_by_the_v3_reader_with_the_command_that_converts_it(small_v21):
    with pytest.raises(DatasetError, match=r"'v2.1'; this reader needs v3.x \(convert a v2.1 / v2.0 dataset with "
                                           r"`finetune-convert DATASET`"):
        load_dataset_meta(small_v21)


def test_conversion_keeps_every_frame_value_and_task(small_v21, tmp_path):
    out = convert_to_v30(small_v21, tmp_path / "v30", data_file_size_mb=0)  # 0 MB: one data file per episode
    assert sorted(p.name for p in (out / "data/chunk-000").iterdir()) == [f"file-{i:03d}.parquet" for i in range(5)]
    assert [p.name for p in (out / f"videos/{CAMERA}/chunk-000").iterdir()] == ["file-000.mp4"]  # all in one video
    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and "total_chunks" not in info and info["total_frames"] == 30
    rows = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [r[f"videos/{CAMERA}/from_timestamp"] for r in rows] == pytest.approx([0, 0.6, 1.2, 1.8, 2.4])
    assert [(r["dataset_from_index"], r["dataset_to_index"]) for r in rows] == [(6 * i, 6 * i + 6) for i in range(5)]
    assert rows[2]["tasks"] == ["move to the red ball"] and len(rows[0]["stats/action/mean"]) == 2

    dataset = LeRobotDataset(out, 3, uint8_images=True)
    for ep in range(5):
        frames, times = decode_video(small_v21 / f"videos/chunk-000/{CAMERA}/episode_{ep:06d}.mp4")
        assert times.tolist() == pytest.approx([i / 10 for i in range(6)])
        source = pq.read_table(small_v21 / f"data/chunk-000/episode_{ep:06d}.parquet").to_pylist()
        for i in range(6):
            item = dataset[6 * ep + i]
            assert np.array_equal(item[CAMERA].permute(1, 2, 0).numpy(), frames[i])  # remuxed: bit-identical
            assert item["observation.state"].tolist() == pytest.approx(source[i]["observation.state"])
            assert item["episode_index"] == ep and item["index"] == 6 * ep + i
            assert item["task"] == load_dataset_meta(out).tasks[source[i]["task_index"]]
        assert dataset[6 * ep + 4]["action_is_pad"].tolist() == [False, False, True]  # chunks stop at the episode end


def test_stats_are_aggregated_from_the_per_episode_stats(small_v21, tmp_path):
    out = convert_to_v30(small_v21, tmp_path / "v30")
    stats = json.loads((out / "meta/stats.json").read_text())
    actions = np.concatenate([np.asarray(pq.read_table(p).column("action").to_pylist())
                              for p in sorted((small_v21 / "data/chunk-000").iterdir())])
    assert stats["action"]["count"] == [30]
    assert stats["action"]["mean"] == pytest.approx(actions.mean(0).tolist(), abs=1e-6)
    assert stats["action"]["std"] == pytest.approx(actions.std(0).tolist(), abs=1e-6)
    assert stats["action"]["min"] == pytest.approx(actions.min(0).tolist())
    # v2.1 stats have no quantiles; the conversion adds them (pi0.5 normalizes with q01/q99)
    assert stats["action"]["q99"] == pytest.approx(np.quantile(actions, 0.99, axis=0).tolist(), abs=2e-3)
    assert np.asarray(stats[CAMERA]["mean"]).shape == (3, 1, 1)


@pytest.mark.parametrize("version", ["v2.1", "v2.0"])
def test_image_columns_convert(tmp_path, version):
    v3_images = make_synthetic_dataset(tmp_path / "images", num_episodes=3, target_colors=["green"], episode_length=4,
                                       image_size=16, use_videos=False)
    legacy = write_legacy_dataset(v3_images, tmp_path / "images_legacy", version=version)
    out = convert_to_v30(legacy, tmp_path / "images_v30")
    assert not (out / "videos").exists()
    if version == "v2.0":  # one stats.json: copied
        assert (out / "meta/stats.json").read_text() == (v3_images / "meta/stats.json").read_text()
    else:  # per-episode image stats aggregated, per channel
        image_stats = json.loads((out / "meta/stats.json").read_text())[CAMERA]
        assert np.asarray(image_stats["mean"]).shape == (3, 1, 1) and image_stats["count"] == [12]
    dataset = LeRobotDataset(out, 2, uint8_images=True)
    cell = pq.read_table(legacy / "data/chunk-000/episode_000002.parquet").column(CAMERA)[3].as_py()
    expected = np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
    assert np.array_equal(dataset[11][CAMERA].permute(1, 2, 0).numpy(), expected)


@pytest.fixture
def conversion_log():
    """The messages finetune.data.v21 logs, whatever logging setup an earlier test left."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("finetune.data.v21")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_ensure_v30_converts_once_and_again_when_the_source_changes(small_v21, tmp_path, conversion_log):
    source = shutil.copytree(small_v21, tmp_path / "ds")
    dest = ensure_v30(source)
    assert dest == tmp_path / "ds_v30"
    assert conversion_log == [f"{source} is LeRobotDataset v2.1: converting it to v3.0 in {dest} (once; reused while "
                              f"the source is unchanged, or convert it yourself with `finetune-convert {source}`)"]
    stamp = (dest / "meta/info.json").stat().st_mtime_ns
    assert ensure_v30(source) == dest and len(conversion_log) == 1  # reused
    assert (dest / "meta/info.json").stat().st_mtime_ns == stamp
    episodes = source / "meta/episodes.jsonl"
    episodes.write_text(episodes.read_text().replace('"move to the blue ball"', '"reach blue"'))
    os.utime(episodes, ns=(stamp + 10**9, stamp + 10**9))
    assert ensure_v30(source) == dest and len(conversion_log) == 2
    assert pq.read_table(dest / "meta/episodes/chunk-000/file-000.parquet").column("tasks")[1].as_py() == ["reach blue"]
    assert ensure_v30(dest) == dest  # a v3.0 folder is itself


def test_datasets_of_mixed_versions_train_together(small_v3, small_v21, tmp_path):
    options = type("Options", (), {"roots": (str(small_v3), str(small_v21)), "repo_id": None, "renames": None,
                                   "weights": None})()
    mix = DataMix.load(options, lambda hub_id: tmp_path)
    assert [s.name for s in mix.sources] == ["small", "small_1"]
    assert mix.sources[1].root == small_v21.parent / "small_v30"
    assert mix.weights == [0.5, 0.5] and mix.merged_meta().stats["action"]["count"].tolist() == [60]


def test_finetune_convert_writes_beside_the_dataset_and_refuses_v3(small_v21, small_v3, tmp_path, capsys):
    source = shutil.copytree(small_v21, tmp_path / "ds")
    assert main([str(source)]) == tmp_path / "ds_v30"
    out = capsys.readouterr().out.strip()
    assert out == f"{tmp_path / 'ds_v30'}: LeRobotDataset v3.0 converted from {source} (v2.1)"
    with pytest.raises(SystemExit) as exit_info:
        main([str(small_v3)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {small_v3 / 'meta/info.json'}: codebase_version is 'v3.0'; finetune-convert converts v2.0 and v2.1 "
        "datasets (this one is v3: train on it directly)")
    with pytest.raises(SystemExit):
        main([str(source)])  # the output folder exists now
    assert "is not empty; pick a new folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reach_v21(dataset_root, tmp_path_factory):
    """The shared test dataset (10 episodes of 16 frames) in the v2.1 layout, and its explicit v3.0 conversion."""
    legacy = write_legacy_dataset(dataset_root, tmp_path_factory.mktemp("reach_v21") / "reach")
    return legacy, convert_to_v30(legacy, tmp_path_factory.mktemp("converted") / "reach")


def test_a_v21_dataset_trains_evaluates_and_resumes_as_its_v30_conversion(reach_v21, policy_dir, tmp_path, capsys):
    legacy, converted = reach_v21
    runs = {}
    for name, root in (("v21", legacy), ("v30", converted)):
        runs[name] = tmp_path / name
        train.main(train_args(policy_dir, root, runs[name], "--steps", "4", "--eval-every", "4"))
    assert "is LeRobotDataset v2.1: converting it to v3.0" in capsys.readouterr().out
    resumed = tmp_path / "resumed"
    train.main(train_args(policy_dir, legacy, resumed, "--steps", "2", "--eval-every", "4"))
    train.main(train_args(policy_dir, legacy, resumed, "--steps", "4", "--eval-every", "4", "--resume"))

    assert losses(runs["v21"]) == losses(runs["v30"]) == losses(resumed)
    assert len(losses(runs["v21"])) == 4

    def evals(run):
        return {m["step"]: m["eval/action_mse"] for m in read_metrics(run / "metrics.jsonl") if "eval/action_mse" in m}

    assert evals(runs["v21"]) == evals(runs["v30"]) and sorted(evals(runs["v21"])) == [0, 4]
    assert evals(resumed)[4] == evals(runs["v21"])[4]
    # finetune-eval reads the run's dataset: the v2.1 folder through its conversion, the same held-out episodes
    offline = {name: evaluation.main(["--checkpoint", str(run / "checkpoints/last"), "--rollout-episodes", "0",
                                      "--output-dir", str(tmp_path / f"eval_{name}")])["offline"]
               for name, run in runs.items()}
    assert offline["v21"]["episodes"] == offline["v30"]["episodes"] == [8, 9]
    assert offline["v21"]["action_mse"] == offline["v30"]["action_mse"] > 0
    # finetune-predict on frames of the v2.1 folder: the same as on its conversion
    predicted = [predict.main(["--checkpoint", str(runs["v21"] / "checkpoints/last"), "--dataset-root", str(root),
                               "--episode", "9", "--frames", "0", "15"])["predicted"] for root in (legacy, converted)]
    assert predicted[0].shape == (2, 10, 2) and np.array_equal(predicted[0], predicted[1])


def _write_h264(path, frames, fps=30):
    """An mp4 as many recorders write it: H.264 with B-frames (decode order differs from presentation order)."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        stream.options = {"bf": "3", "g": "12", "crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_remuxed_videos_with_b_frames_decode_to_the_same_frames_at_their_offsets(tmp_path):
    rng = np.random.default_rng(0)
    paths, sources = [], []
    for i, n in enumerate((25, 17, 31)):
        frames = np.clip(np.arange(n)[:, None, None, None] * 8 + rng.integers(0, 30, (1, 32, 32, 3)), 0, 255)
        paths.append(tmp_path / f"episode_{i}.mp4")
        _write_h264(paths[-1], frames.astype(np.uint8))
        sources.append(decode_video(paths[-1]))
    starts = concat_videos(paths, tmp_path / "file-000.mp4")
    assert starts == pytest.approx([0, 25 / 30, 42 / 30])
    frames, times = decode_video(tmp_path / "file-000.mp4")
    assert np.array_equal(frames, np.concatenate([f for f, _ in sources]))
    assert times == pytest.approx(np.concatenate([s + t for s, (_, t) in zip(starts, sources)]), abs=1e-9)
    _write_h264(tmp_path / "wide.mp4", np.zeros((3, 32, 64, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"wide\.mp4 is encoded as \('h264', 64, 32\), unlike .+ \('h264', 32, 32\): "
                                           r".+; convert with `finetune-convert DATASET --video-file-size-mb 0`"):
        concat_videos([paths[0], tmp_path / "wide.mp4"], tmp_path / "mixed.mp4")


def test_a_mixture_of_v21_and_v30_datasets_trains_as_its_all_v30_version(reach_v21, dataset_root, policy_dir,
                                                                         tmp_path):
    legacy, converted = reach_v21

    def run(second, name):
        args = train_args(policy_dir, dataset_root, tmp_path / name, "--steps", "2", "--dataset.eval-episodes", "1")
        at = args.index("--dataset.root")
        args[at + 1 : at + 2] = [str(dataset_root), str(second)]
        summary = train.main([*args, "--dataset.weights", "0.5", "0.5"])
        return losses(tmp_path / name), summary

    mixed, all_v30 = run(legacy, "mixed"), run(converted, "all_v30")
    assert mixed[0] == all_v30[0] and len(mixed[0]) == 2
    config = json.loads((tmp_path / "mixed/train_config.json").read_text())
    assert config["dataset"]["root"] == [str(dataset_root), str(legacy)]  # the run records what the user named


def test_a_damaged_v21_dataset_is_refused_in_one_line_naming_the_file(small_v21, tmp_path):
    source = shutil.copytree(small_v21, tmp_path / "ds")
    episode = source / "data/chunk-000/episode_000003.parquet"
    table = pq.read_table(episode)
    pq.write_table(table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                                    table.column("timestamp").cast("float64")), episode)
    with pytest.raises(DatasetError) as info:
        convert_to_v30(source, tmp_path / "out")
    assert str(info.value) == (f"{episode}: its columns differ from the dataset's first data file (timestamp: double "
                               "here, float in episode_000000.parquet); rewrite it with the same columns and types "
                               f"(`finetune-check {source}` lists every file)")
    episode.write_bytes(episode.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"episode_000003\.parquet: cannot read parquet \(.+\); the file is "
                                           r"truncated or not parquet"):
        ensure_v30(source)
    assert not list(tmp_path.glob(".ds_v30.tmp*")) and not (tmp_path / "ds_v30").exists()  # nothing half-written
