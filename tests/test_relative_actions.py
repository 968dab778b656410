"""Relative actions (LeRobot's pi0 / pi0.5 semantics): conversion, stats, training, checkpoint round trip, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import make_tiny_pi_policy, train_args

from finetune import train
from finetune.config import from_dict
from finetune.data import LeRobotDataset, load_dataset_meta
from finetune.data.stats import relative_action_stats
from finetune.inference.predict import Predictor
from finetune.policies import PI0Config, load_policy_config
from finetune.policies.lerobot_processor import pipeline_steps
from finetune.policies.processor import load_stats
from finetune.policies.relative_actions import relative_mask, to_absolute, to_relative


def test_mask_excludes_joints_by_name_or_part_of_a_name():
    names = ["shoulder_pan", "elbow", "Gripper_left", "wrist"]
    assert relative_mask(4, names, ["gripper"]) == [True, True, False, True]
    assert relative_mask(4, names, ["elbow", "WRIST"]) == [True, False, True, False]
    assert relative_mask(4, None, ["gripper"]) == [True] * 4  # no names: every dim relative (LeRobot)
    assert relative_mask(5, names, []) == [True] * 5


def test_absolute_relative_absolute_round_trip():
    g = torch.Generator().manual_seed(0)
    actions, state = torch.randn(3, 7, 4, generator=g), torch.randn(3, 5, generator=g)  # state may be wider
    mask = relative_mask(4, ["a", "b", "gripper", "c"], ["gripper"])
    rel = to_relative(actions, state, mask)
    torch.testing.assert_close(rel[..., 2], actions[..., 2])  # the gripper stays absolute
    torch.testing.assert_close(rel[..., [0, 1, 3]], actions[..., [0, 1, 3]] - state[:, None, [0, 1, 3]])
    torch.testing.assert_close(to_absolute(rel, state, mask), actions)
    single = to_relative(actions[:, 0], state, mask)  # (B, A) actions too
    torch.testing.assert_close(single, rel[:, 0])


def test_relative_stats_cover_every_in_episode_chunk(dataset_root):
    chunk = 5
    ds = LeRobotDataset(dataset_root, chunk)
    rel = []
    for i in range(len(ds)):
        item = ds[i]
        if not item["action_is_pad"].any():  # chunks that cross an episode's end are left out, as LeRobot
            rel.append((item["action"] - item["observation.state"] * torch.tensor([0.0, 1.0])).numpy())
    rel = np.concatenate(rel).astype(np.float64)
    stats = relative_action_stats(dataset_root, chunk, [False, True])
    assert stats["count"].tolist() == [len(rel)] == [10 * (16 - chunk + 1) * chunk]
    np.testing.assert_allclose(stats["mean"], rel.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["std"], rel.std(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["min"], rel.min(0), rtol=1e-6)


@pytest.fixture(scope="module")
def pi0_dir(tmp_path_factory, dataset_root):
    return make_tiny_pi_policy(tmp_path_factory.mktemp("rel") / "tiny_pi0", load_dataset_meta(dataset_root), "pi0")


def _args(pi0_dir, dataset_root, out, *extra):
    return train_args(pi0_dir, dataset_root, out, "--policy.dtype", "float32", "--steps", "2", *extra,
                      preset="pi0_lora")


@pytest.fixture(scope="module")
def relative_run(pi0_dir, dataset_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel_run") / "run"
    train.main(_args(pi0_dir, dataset_root, out, "--policy.use-relative-actions",
                     "--policy.relative-exclude-joints", "dx"))
    return out


def test_training_on_relative_actions_round_trips_through_the_checkpoint(relative_run, dataset_root):
    last = relative_run / "checkpoints/last"
    config = load_policy_config(last)
    assert config.use_relative_actions and config.relative_exclude_joints == ["dx"]
    assert config.action_feature_names == ["dx", "dy"]
    assert PI0Config.from_dict(json.loads(json.dumps(config.to_dict()))).to_dict() == config.to_dict()
    train_cfg = from_dict(json.loads((last / "train_config.json").read_text()))
    assert train_cfg.policy.use_relative_actions is True and train_cfg.policy.relative_exclude_joints == ("dx",)
    # the saved action stats are those of the relative actions (dy minus its state), not the dataset's absolute ones
    saved = load_stats(last)["action"]
    expected = relative_action_stats(dataset_root, config.chunk_size, [False, True])
    np.testing.assert_allclose(saved["mean"].numpy(), expected["mean"], rtol=1e-5)
    absolute = load_dataset_meta(dataset_root).stats["action"]
    assert not np.allclose(saved["mean"].numpy()[1], absolute["mean"][1], atol=1e-3)
    # LeRobot's processor files of a merged export convert back to absolute actions
    pre, post = pipeline_steps(config, {}, None)
    relative_step = next(s for s in pre if s["registry_name"] == "relative_actions_processor")
    assert relative_step["config"] == {"enabled": True, "exclude_joints": ["dx"], "action_names": ["dx", "dy"]}
    assert next(s for s in post if s["registry_name"] == "absolute_actions_processor")["config"]["enabled"]


def test_predictions_are_absolute_actions(relative_run, dataset_root):
    predictor = Predictor.from_checkpoint(relative_run / "checkpoints/last", device="cpu")
    sample = LeRobotDataset(dataset_root, predictor.chunk_size)[20]
    absolute = predictor(sample, torch.Generator().manual_seed(3))
    # the same draw by hand: the policy's normalized relative chunk, unnormalized, plus the state on dy only
    batch = predictor.batch([sample])
    noise = torch.randn(1, predictor.chunk_size, predictor.config.max_action_dim,
                        generator=torch.Generator().manual_seed(3))
    normalized = predictor.policy.predict_action_chunk(batch, noise=noise)[0]
    stats = predictor.processor.normalizer.stats["action"]
    relative = normalized * (stats["std"] + 1e-8) + stats["mean"]
    state = sample["observation.state"]
    expected = relative + torch.stack([torch.zeros(()), state[1]])
    np.testing.assert_allclose(absolute, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_unknown_excluded_joint_is_a_one_line_error(pi0_dir, dataset_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(_args(pi0_dir, dataset_root, tmp_path / "out", "--policy.use-relative-actions",
                         "--policy.relative-exclude-joints", "gripper"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "['gripper'] match no action name of the dataset (['dx', 'dy'])" in err


def test_smolvla_refuses_relative_actions(policy_dir, dataset_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, dataset_root, tmp_path / "out", "--steps", "1",
                              "--policy.use-relative-actions"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "smolvla policy has no relative actions" in err
