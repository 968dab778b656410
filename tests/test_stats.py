"""finetune-stats: LeRobot-format stats.json from a dataset's files, and training's refusal without the stats."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import train_args

from finetune import train
from finetune.data import make_synthetic_dataset
from finetune.data.stats import NUM_BINS, STAT_NAMES, aggregate_stats, array_stats, image_stats
from finetune.data.stats import main as stats_main

CAM = "observation.images.top"


def _dataset(path, use_videos):
    return make_synthetic_dataset(path, num_episodes=4, target_colors=["red", "green"], episode_length=12, seed=3,
                                  episodes_per_file=3, use_videos=use_videos)


def _stats(root):
    return json.loads((root / "meta/stats.json").read_text())


@pytest.mark.parametrize("use_videos", [False, True])
def test_command_reproduces_the_writers_stats(tmp_path, use_videos):
    root = _dataset(tmp_path / "ds", use_videos)
    written = _stats(root)
    (root / "meta/stats.json").unlink()
    stats_main([str(root)])
    computed = _stats(root)
    assert set(computed) >= {"observation.state", "action", CAM}
    for key in ("observation.state", "action", CAM):
        assert set(computed[key]) == set(STAT_NAMES), key
        assert computed[key]["count"] == written[key]["count"], key
        # Lossless PNG frames give the writer's numbers exactly; mp4 decoding moves pixels by a few levels.
        atol = 1e-6 if key != CAM or not use_videos else 0.03
        for name in STAT_NAMES:
            if key == CAM and use_videos and name not in ("mean", "std", "q50", "count"):
                continue  # mp4 (yuv420) ringing around the balls moves the tails: only the bulk is comparable
            np.testing.assert_allclose(computed[key][name], written[key][name], rtol=1e-5, atol=atol,
                                       err_msg=f"{key}.{name}")
    assert np.asarray(computed[CAM]["mean"]).shape == (3, 1, 1)


def test_missing_only_keeps_present_stats(tmp_path):
    root = _dataset(tmp_path / "ds", use_videos=False)
    written = _stats(root)
    partial = json.loads(json.dumps(written))
    del partial["action"]
    partial["observation.state"]["mean"] = [123.0, 456.0]  # a marker: must survive --missing-only
    del partial[CAM]["q99"]  # a feature that lacks one statistic is recomputed whole
    (root / "meta/stats.json").write_text(json.dumps(partial))
    computed = stats_main([str(root), "--missing-only"])
    assert set(computed) == {"action", CAM}
    after = _stats(root)
    assert after["observation.state"]["mean"] == [123.0, 456.0]
    np.testing.assert_allclose(after["action"]["q01"], written["action"]["q01"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(after[CAM]["q99"], written[CAM]["q99"], rtol=1e-5, atol=1e-7)


def test_quantiles_follow_lerobots_histogram_estimator():
    x = np.arange(1000, dtype=np.float64).reshape(-1, 1)  # one value per histogram bin
    stats = array_stats(x)
    width = 999 / NUM_BINS
    # q50: the 500th value (499) holds the target count 500; its bin is filled completely -> the bin's right edge.
    assert 499 <= stats["q50"][0] <= 499 + width + 1e-9
    assert 9 <= stats["q01"][0] <= 9 + width + 1e-9
    assert stats["mean"][0] == pytest.approx(499.5) and stats["std"][0] == pytest.approx(np.std(x))
    assert (stats["min"][0], stats["max"][0], stats["count"].tolist()) == (0, 999, [1000])
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    frames[1] = 255
    img = image_stats(frames)
    assert img["mean"].shape == (3, 1, 1) and np.allclose(img["mean"], 0.5) and np.allclose(img["std"], 0.5)
    assert np.allclose(img["q01"], 0.0, atol=1e-6) and np.allclose(img["q99"], 1.0, atol=1e-6)


def test_aggregate_stats_weighs_by_count():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (300, 2)), rng.normal(3, 2, (100, 2))
    merged = aggregate_stats([{"x": array_stats(a)}, {"x": array_stats(b)}])["x"]
    union = np.concatenate([a, b])
    np.testing.assert_allclose(merged["mean"], union.mean(0), rtol=1e-10)
    np.testing.assert_allclose(merged["std"], union.std(0), rtol=1e-10)
    assert merged["count"].tolist() == [400]
    # LeRobot's quantile envelope: min over datasets at or below q50, max above.
    np.testing.assert_allclose(merged["q01"], np.minimum(array_stats(a)["q01"], array_stats(b)["q01"]))
    np.testing.assert_allclose(merged["q99"], np.maximum(array_stats(a)["q99"], array_stats(b)["q99"]))


def test_training_without_stats_stops_before_building_a_model(policy_dir, dataset_root, tmp_path, capsys,
                                                              monkeypatch):
    root = tmp_path / "no_stats"
    shutil.copytree(dataset_root, root)
    (root / "meta/stats.json").unlink()
    built = []
    monkeypatch.setattr(train, "load_base_policy", lambda *a, **k: built.append(1))
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, root, tmp_path / "out", "--steps", "1"))
    assert exit_info.value.code == 2 and not built
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "observation.state ['mean', 'std']" in err and "action ['mean', 'std']" in err
    assert f"finetune-stats {root}" in err


def test_command_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stats_main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "meta/info.json" in err
    root = _dataset(tmp_path / "ds", use_videos=False)
    with pytest.raises(SystemExit):
        stats_main([str(root), "--keys", "observation.nothing"])
    err = capsys.readouterr().err.strip()
    assert "observation.nothing" in err and "\n" not in err
