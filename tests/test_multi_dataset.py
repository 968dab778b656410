"""Episode selection and several datasets in one run (finetune.data.multi and its hooks in train.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import train_args

from finetune import train
from finetune.config import cli
from finetune.data.multi import parse_episodes, split_selection


def test_episode_specs_parse_to_sorted_unique_indices():
    assert parse_episodes(["0-3", "7", "2,9-10"]) == [[0, 1, 2, 3, 7, 9, 10]]
    assert parse_episodes([]) == [None]
    assert parse_episodes(["1:4-5", "0:0"], num_datasets=2) == [[0], [4, 5]]
    assert parse_episodes(["1:2"], num_datasets=3) == [None, [2], None]
    assert split_selection(range(10), [0, 1, 2, 5, 8], 2) == ([0, 1, 2], [5, 8])
    assert split_selection(range(4), None, 1) == ([0, 1, 2], [3])


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("spec, expected", [
    (["x"], "expected an episode index N or a range A-B"),
    (["5-2"], "ends before it starts"),
    (["0-3", "42"], "episode(s) [42] that"),
    (["0-1"], "leaves no training episode"),
    (["1:0-3"], "dataset 1 does not exist"),
])
def test_bad_episode_selections_are_one_line_errors(policy_dir, dataset_root, tmp_path, capsys, spec, expected):
    argv = train_args(policy_dir, dataset_root, tmp_path / "out", "--steps", "1", "--dataset.episodes", *spec)
    assert expected in _error(capsys, argv)


def test_training_uses_only_the_selected_episodes(policy_dir, dataset_root, tmp_path):
    from finetune.train import make_accelerator, setup

    cfg = cli(train_args(policy_dir, dataset_root, tmp_path / "out", "--steps", "1", "--dataset.episodes", "1-4",
                         "7", "--dataset.eval-episodes", "1"))
    run = setup(cfg, make_accelerator(cfg))
    train_set = run.data.loader.dataset
    seen = {int(train_set[i]["episode_index"]) for i in range(len(train_set))}
    assert seen == {1, 2, 3, 4} and len(train_set) == 4 * 16
    # held out: the last of the selection (episode 7), not the dataset's last episodes
    assert set(run.data.eval_batches[0].batch["episode_index"].tolist()) == {7}
    run.accelerator.free_memory()
    run.accelerator._custom_objects.clear()


# --- several datasets -------------------------------------------------------------------------------------------------

TOP, FRONT = "observation.images.top", "observation.images.front"


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """A: 6 episodes x 16 frames at 10 fps, camera `top`; B: 4 episodes x 12 frames at 20 fps, camera `front`."""
    from finetune.data import make_synthetic_dataset

    base = tmp_path_factory.mktemp("mix")
    a = make_synthetic_dataset(base / "robot_a", num_episodes=6, target_colors=["red", "green"], episode_length=16,
                               fps=10, seed=1, episodes_per_file=4)
    b = make_synthetic_dataset(base / "robot_b", num_episodes=4, target_colors=["blue"], episode_length=12, fps=20,
                               seed=2, episodes_per_file=3, camera_key=FRONT)
    return a, b


def _mix_args(policy_dir, two_datasets, out, *extra):
    a, b = two_datasets
    args = train_args(policy_dir, a, out, "--dataset.eval-episodes", "1", *extra)
    at = args.index("--dataset.root")
    args[at + 1 : at + 2] = [str(a), str(b)]
    return [*args, "--dataset.renames", "-", f"{FRONT}:{TOP}", "--dataset.weights", "0.8", "0.2"]


def test_weighted_sampler_draws_the_mixture_and_resumes_anywhere():
    from finetune.data.multi import WeightedMixtureSampler

    lengths = [96, 48]
    ranks = [WeightedMixtureSampler(lengths, [0.8, 0.2], 16, world_size=2, rank=r, seed=5) for r in (0, 1)]
    draws = np.concatenate([ranks[r].batch_at(p) for p in range(100) for r in (0, 1)])  # 3200 draws
    share_a = float((draws < 96).mean())
    assert abs(share_a - 0.8) < 0.025, share_a  # 3 sigma is 0.021 over 3200 draws
    assert draws.min() >= 0 and draws.max() < 144 and len(set(draws[draws >= 96])) > 30  # B's frames spread
    # the two ranks hold disjoint slices of one global batch
    g = ranks[0].global_batch(7)
    assert ranks[0].batch_at(7) + ranks[1].batch_at(7) == g.tolist()
    resumed = WeightedMixtureSampler(lengths, [0.8, 0.2], 16, world_size=2, rank=1, seed=5)
    resumed.set_position(42)
    assert next(iter(resumed)) == ranks[1].batch_at(42)
    by_frames = WeightedMixtureSampler(lengths, [96, 48], 16, seed=5)  # default weights: proportional to frames
    share = float((np.concatenate([by_frames.batch_at(p) for p in range(200)]) < 96).mean())
    assert abs(share - 2 / 3) < 0.035, share


def test_merged_stats_equal_the_union(two_datasets):
    import pyarrow.parquet as pq

    from finetune.config import DataOptions
    from finetune.data.multi import DataMix
    from finetune.data.stats import array_stats

    a, b = two_datasets
    mix = DataMix.load(DataOptions(root=(str(a), str(b)), renames=("-", f"{FRONT}:{TOP}")), lambda r: r)
    merged = mix.merged_meta().stats
    assert set(merged) >= {"observation.state", "action", TOP} and FRONT not in merged
    for key in ("observation.state", "action"):
        union = np.concatenate([np.asarray(pq.read_table(p, columns=[key]).column(key).to_pylist(), np.float64)
                                for root in (a, b) for p in sorted((root / "data").glob("*/*.parquet"))])
        np.testing.assert_allclose(merged[key]["mean"], union.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(merged[key]["std"], union.std(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(merged[key]["min"], union.min(0), rtol=1e-6)
        np.testing.assert_allclose(merged[key]["max"], union.max(0), rtol=1e-6)
        assert merged[key]["count"].tolist() == [6 * 16 + 4 * 12]
        # quantiles as LeRobot aggregates them: the envelope of the per-dataset quantiles
        per = [load_stats_json(root)[key] for root in (a, b)]
        np.testing.assert_allclose(merged[key]["q01"], np.minimum(per[0]["q01"], per[1]["q01"]), rtol=1e-6)
        np.testing.assert_allclose(merged[key]["q99"], np.maximum(per[0]["q99"], per[1]["q99"]), rtol=1e-6)
        # and the union's own quantiles lie inside that envelope
        assert (merged[key]["q01"] <= array_stats(union)["q01"] + 1e-6).all()
    cam = merged[TOP]
    counts = [load_stats_json(root)[k]["count"][0] for root, k in ((a, TOP), (b, FRONT))]
    means = [np.asarray(load_stats_json(root)[k]["mean"]) for root, k in ((a, TOP), (b, FRONT))]
    np.testing.assert_allclose(cam["mean"], (counts[0] * means[0] + counts[1] * means[1]) / sum(counts), rtol=1e-6)


def load_stats_json(root):
    import json

    return json.loads((root / "meta/stats.json").read_text())


def test_each_dataset_is_read_at_its_own_fps(two_datasets):
    from finetune.data import LeRobotDataset, render, synthetic_episode
    from finetune.data.multi import MixtureDataset

    a, b = two_datasets
    mix = MixtureDataset([LeRobotDataset(a, 5), LeRobotDataset(b, 5)], [{}, {FRONT: TOP}])
    scene, states, _ = synthetic_episode(2, 1, "blue", episode_length=12)
    for t in (2, 4):  # B's episode 1 while the agent moves: 0.1 s and 0.2 s in at 20 fps
        item = mix[6 * 16 + 12 + t]
        assert item["dataset_index"] == 1 and item["episode_index"] == 1 and item["frame_index"] == t
        image = item[TOP].permute(1, 2, 0).float() * (255 if item[TOP].dtype.is_floating_point else 1)
        errors = [float(np.abs(image.numpy() - render(scene, s).astype(np.float32)).mean()) for s in states]
        assert int(np.argmin(errors)) == t, errors  # the decoded picture is frame t's, not a neighbor's


@pytest.fixture(scope="module")
def mixed_run(policy_dir, two_datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "run"
    train.main(_mix_args(policy_dir, two_datasets, out, "--steps", "4", "--eval-every", "2"))
    return out


def test_mixed_run_logs_held_out_mse_per_dataset_and_records_the_mix(mixed_run, two_datasets):
    import json

    from finetune.training.metrics import read_metrics

    a, b = two_datasets
    evals = [m for m in read_metrics(mixed_run / "metrics.jsonl") if "eval/action_mse" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    for m in evals:
        per = m["eval/action_mse/robot_a"], m["eval/action_mse/robot_b"]
        assert min(per) <= m["eval/action_mse"] <= max(per) and per[0] != per[1]
    saved = json.loads((mixed_run / "checkpoints/last/train_config.json").read_text())["dataset"]
    assert saved["root"] == [str(a), str(b)] and saved["weights"] == [0.8, 0.2]
    assert saved["renames"] == ["-", f"{FRONT}:{TOP}"]


def test_mixed_run_resumes_exactly(mixed_run, policy_dir, two_datasets, tmp_path):
    from safetensors.torch import load_file

    from finetune.training.metrics import read_metrics

    out = tmp_path / "resumed"
    train.main(_mix_args(policy_dir, two_datasets, out, "--steps", "2", "--eval-every", "2"))
    train.main(_mix_args(policy_dir, two_datasets, out, "--steps", "4", "--eval-every", "2", "--resume"))

    def losses(run):
        return {m["step"]: m["train/loss"] for m in read_metrics(run / "metrics.jsonl") if "train/loss" in m}

    straight, resumed = losses(mixed_run), losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step
    x = load_file(str(mixed_run / "checkpoints/000004/adapter_model.safetensors"))
    y = load_file(str(out / "checkpoints/000004/adapter_model.safetensors"))
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("extra, expected", [
    (["--dataset.weights", "1.0"], "--dataset.weights has 1 value(s) for 2 dataset(s)"),
    (["--dataset.weights", "0.5", "-1"], "must be finite, >= 0 and not all 0"),
    (["--dataset.renames", "-"], "--dataset.renames has 1 entr(ies) for 2 dataset(s)"),
    (["--dataset.renames", "-", "front=top"], "is not FEATURE:NAME"),
    (["--dataset.renames", "-", "-"], f"dataset 1 ({{b}}) has cameras ['{FRONT}'] but dataset 0"),
    (["--dataset.episodes", "0-3"], "with 2 datasets name the dataset first"),
])
def test_bad_mixture_flags_are_one_line_errors(policy_dir, two_datasets, tmp_path, capsys, extra, expected):
    argv = _mix_args(policy_dir, two_datasets, tmp_path / "out", "--steps", "1") + extra  # later flags win
    assert expected.format(b=two_datasets[1]) in _error(capsys, argv)


def test_datasets_whose_action_sizes_differ_are_refused(policy_dir, two_datasets, tmp_path, capsys):
    import json
    import shutil

    a, b = two_datasets
    wide = tmp_path / "wide_b"
    shutil.copytree(b, wide)
    info = json.loads((wide / "meta/info.json").read_text())
    info["features"]["action"]["shape"] = [3]
    (wide / "meta/info.json").write_text(json.dumps(info))
    argv = _mix_args(policy_dir, (a, wide), tmp_path / "out", "--steps", "1")
    err = _error(capsys, argv)
    assert f"dataset 1 ({wide}): 'action' has shape [3] but dataset 0 ({a}) has [2]" in err


def test_held_out_episodes_of_a_mixed_run_for_finetune_eval(mixed_run):
    from finetune.eval import heldout_episodes

    assert heldout_episodes(mixed_run / "checkpoints/last", 6) == [5]  # robot_a's last episode


@pytest.mark.parametrize("root", ["no/such_dataset", "./missing_folder"])
def test_a_missing_dataset_among_several_is_a_one_line_error(policy_dir, two_datasets, tmp_path, capsys, root,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = two_datasets
    argv = _mix_args(policy_dir, two_datasets, tmp_path / "out", "--steps", "1")
    at = argv.index("--dataset.root")
    argv[at + 1 : at + 3] = [str(a), root]
    err = _error(capsys, argv)
    assert root in err or root.split("/")[-1] in err


def test_default_weights_follow_frames_and_resume(policy_dir, two_datasets, tmp_path):
    import json

    out = tmp_path / "by_frames"
    args = _mix_args(policy_dir, two_datasets, out, "--steps", "1", "--checkpoint.every", "1")[:-3]  # no weights
    train.main(args)
    saved = json.loads((out / "checkpoints/last/train_config.json").read_text())["dataset"]
    # training splits aside, the default mixture is each dataset's share of all frames: 96 and 48 of 144
    assert saved["weights"] == pytest.approx([96 / 144, 48 / 144])
    summary = train.main([*args[: args.index("--steps")], "--steps", "2", *args[args.index("--steps") + 2 :],
                          "--resume"])
    assert summary["checkpoint"].endswith("000002")


def test_lerobot_spellings_of_the_new_flags_translate(tmp_path):
    from test_lerobot_cli import write_config

    from finetune.config import cli

    cfg = cli(["smolvla_lora", "--dataset.episodes=[0,1,5]", "--dataset.root=[a,b]", "--dataset.weights=[0.7,0.3]",
               "--policy.use_relative_actions=true", '--policy.relative_exclude_joints=["gripper"]',
               "--ema.decay=0.99"])
    assert cfg.dataset.episodes == ("0", "1", "5") and cfg.dataset.root == ("a", "b")
    assert cfg.dataset.weights == (0.7, 0.3) and cfg.ema.decay == 0.99
    assert cfg.policy.use_relative_actions is True and cfg.policy.relative_exclude_joints == ("gripper",)
    assert parse_episodes(cfg.dataset.episodes) == [[0, 1, 5]]
    # a LeRobot train_config.json's episode list carries over too
    path = write_config(tmp_path, dataset__episodes=[0, 1, 2])
    assert cli(["smolvla_lora", f"--config_path={path}", "--policy.push_to_hub=false"]).dataset.episodes == (
        "0", "1", "2")
