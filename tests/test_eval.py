"""Offline metrics on held-out episodes, the simulated reach task, closed-loop rollouts and the demo's report."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from PIL import Image

from finetune import eval as evaluation
from finetune import train
from finetune.data import COLORS, LeRobotDataset, instruction, load_dataset_meta, synthetic
from finetune.envs import ENV_ID, ReachEnv
from finetune.predict import Predictor


@pytest.fixture(scope="module")
def checkpoint(lora_run):
    return lora_run / "checkpoints" / "last"


class OraclePredictor:
    """Reads the target ball's position from the image (pixels of the instruction's color) and heads for it: what
    a perfect policy does with exactly the inputs the rollout gives a real one."""

    def __init__(self, chunk_size=10, n_action_steps=5):
        self.chunk_size = chunk_size
        self.config = SimpleNamespace(n_action_steps=n_action_steps)
        self.batch_sizes = []

    def predict_batch(self, observations, generator=None):
        self.batch_sizes.append(len(observations))
        chunks = []
        for obs in observations:
            image = obs["observation.images.top"]
            color = obs["task"].split()[3]
            rows, cols = np.nonzero((image == np.array(COLORS[color], np.uint8)).all(-1))
            size = image.shape[0]
            target = np.array([(cols.mean() + 0.5) / size * 2 - 1, 1 - (rows.mean() + 0.5) / size * 2])
            xy, chunk = np.asarray(obs["observation.state"], np.float64), []
            for _ in range(self.chunk_size):
                delta = target - xy
                move = delta / max(np.linalg.norm(delta), 1e-9) * min(np.linalg.norm(delta), 0.1)
                chunk.append(move)
                xy = xy + move
            chunks.append(chunk)
        return np.asarray(chunks, np.float32)


def test_env_renders_the_datasets_images_state_and_instruction(dataset_root):
    meta = load_dataset_meta(dataset_root)
    env = gym.make(ENV_ID, target_colors=("red", "green"), image_size=64).unwrapped
    obs, info = env.reset(seed=3, options={"target_color": "green"})
    assert set(obs) == {"observation.images.top", "observation.state"}
    assert obs["observation.images.top"].shape == tuple(meta.features["observation.images.top"]["shape"])
    np.testing.assert_array_equal(obs["observation.images.top"], synthetic.render(env.scene, env.agent, 64))
    np.testing.assert_array_equal(obs["observation.state"], env.scene.agent_start)
    assert info["task"] == instruction("green") == env.task and info["task"] in meta.tasks
    again, _ = env.reset(seed=3, options={"target_color": "green"})  # seeded: the same scene
    np.testing.assert_array_equal(again["observation.images.top"], obs["observation.images.top"])
    rng = np.random.default_rng(0)
    for t in range(40):  # the dataset's scripted expert solves it
        obs, reward, terminated, truncated, info = env.step(synthetic.expert_action(env.scene, env.agent, rng))
        if terminated:
            break
    assert terminated and reward == 1.0 and info["is_success"] and t < 30
    env = ReachEnv(max_steps=2)
    env.reset(seed=0)
    assert not env.step(np.zeros(2))[3] and env.step(np.zeros(2))[3]  # truncated after max_steps


def test_env_with_inverted_axes_takes_the_datasets_negated_commands(dataset_root):
    env = ReachEnv(("cyan",), action_sign=-1.0)
    env.reset(seed=1)
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, _, terminated, _, _ = env.step(-synthetic.expert_action(env.scene, env.agent, rng))
        if terminated:
            break
    assert terminated
    assert evaluation.settings_from_dataset(dataset_root).action_sign == 1.0  # as the dataset's info.json says


def test_rollouts_execute_n_action_steps_per_chunk_and_count_successes():
    settings = evaluation.RolloutSettings(colors=("yellow", "cyan"), episodes=6, seed=0, max_steps=40, record=2)
    oracle = OraclePredictor(chunk_size=10, n_action_steps=5)
    result = evaluation.rollout(oracle, settings)
    assert result["success_rate"] == 1.0 and result["per_color"] == {"yellow": 1.0, "cyan": 1.0}
    assert result["n_action_steps"] == 5 and result["mean_steps"] < 30
    assert oracle.batch_sizes[0] == 6  # every episode in one batched call

    still = OraclePredictor(chunk_size=10)
    still.predict_batch = lambda obs, generator=None: (still.batch_sizes.append(len(obs)),
                                                       np.zeros((len(obs), 10, 2), np.float32))[1]
    settings = dataclasses.replace(settings, max_steps=12, n_action_steps=5)
    result = evaluation.rollout(still, settings)
    assert result["success_rate"] == 0.0 and result["mean_steps"] == 12
    assert still.batch_sizes == [6, 6, 6]  # a new chunk at steps 0, 5 and 10: receding horizon
    assert len(result["frames"]) == 2 and len(result["frames"][0]) == 13  # first frame + one per step


def test_offline_metrics_per_dimension_and_chunk_step(checkpoint, dataset_root, monkeypatch):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    real = evaluation.offline_metrics(predictor, dataset_root, episodes=[8, 9], batch_size=16)
    assert real["frames"] == 32 and real["episodes"] == [8, 9] and real["action_names"] == ["dx", "dy"]
    assert len(real["action_mse_per_dim"]) == 2 and len(real["action_mse_per_chunk_step"]) == 10
    assert real["action_mse"] > 0 and real["action_l1"] > 0 and real["chunk_mse"]["max"] >= real["chunk_mse"]["mean"]
    assert np.isclose(np.mean(real["action_mse_per_dim"]), real["action_mse"])

    # A policy that always answers 0 (normalized) predicts the stats' mean: the errors are the recorded actions'
    # deviations from it, over the in-episode steps of every chunk.
    monkeypatch.setattr(predictor.policy, "predict_action_chunk",
                        lambda batch, noise=None: torch.zeros(len(batch["observation.state"]), 10, 2))
    got = evaluation.offline_metrics(predictor, dataset_root, episodes=[8, 9], batch_size=5)
    dataset = LeRobotDataset(dataset_root, 10, episodes=[8, 9])
    mean = predictor.processor.normalizer.stats["action"]["mean"].double()
    err = torch.stack([dataset[i]["action"].double() - mean for i in range(len(dataset))])
    valid = ~torch.stack([dataset[i]["action_is_pad"] for i in range(len(dataset))])
    np.testing.assert_allclose(got["action_mse_per_dim"], (err[valid] ** 2).mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["action_l1_per_dim"], err[valid].abs().mean(0).numpy(), rtol=1e-6)
    step0 = (err[:, 0] ** 2).mean().item()  # the first step of a chunk is never padding
    assert got["action_mse_per_chunk_step"][0] == pytest.approx(step0, rel=1e-6)


def test_eval_cli_writes_metrics_rollout_gifs_and_plot(checkpoint, lora_run, tmp_path, capsys):
    result = evaluation.main(["--checkpoint", str(checkpoint), "--max-frames", "8", "--rollout-episodes", "3",
                              "--max-steps", "6", "--compare-base", "--gif-episodes", "2", "--output-dir",
                              str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "offline, 8 frames of episodes [8, 9]" in out and "closed-loop success over 3 seeded episodes" in out
    saved = json.loads((tmp_path / "eval" / "closed_loop.json").read_text())
    assert saved["colors"] == ["red", "green"] and {"before", "after"} <= set(saved)
    assert saved["after"]["episodes"] == 3 and result["closed_loop"]["after"]["success_rate"] == \
        saved["after"]["success_rate"]
    assert json.loads((tmp_path / "eval" / "offline_metrics.json").read_text())["frames"] == 8
    for name in ("rollout_before.gif", "rollout_after.gif"):
        with Image.open(tmp_path / "eval" / name) as gif:  # 2 episodes of 7 frames, each end held for 1 s
            assert gif.size == (256, 256) and gif.n_frames > 2
            total = 0
            for i in range(gif.n_frames):
                gif.seek(i)
                total += gif.info["duration"]
            assert total == 2 * (6 * 100 + 1000)
    with Image.open(tmp_path / "eval" / "metrics.png") as png:
        assert png.format == "PNG" and png.size[0] > 600


def test_demo_ends_with_closed_loop_success_before_and_after(monkeypatch, lora_run, policy_dir, dataset_root,
                                                            tmp_path, capsys):
    def prepare_demo(cfg, accelerator, run_training):
        return dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, path=str(policy_dir)),
                                   dataset=dataclasses.replace(cfg.dataset, root=str(dataset_root)))

    monkeypatch.setattr("finetune.demo.prepare_demo", prepare_demo)
    monkeypatch.setattr(train, "run_training", lambda cfg, acc: {"checkpoint": str(lora_run / "checkpoints/last")})
    out = tmp_path / "demo"
    summary = train.main(["demo", "--output-dir", str(out), "--demo.rollout-episodes", "3"])
    assert 0 <= summary["success_before"] <= 1 and 0 <= summary["success_after"] <= 1
    saved = json.loads((out / "eval" / "closed_loop.json").read_text())
    assert saved["colors"] == ["red", "green", "blue"] and saved["before"]["episodes"] == 3
    assert (out / "eval" / "rollout_after.gif").is_file() and (out / "eval" / "rollout_before.gif").is_file()
    assert "closed-loop success over 3 seeded episodes (red, green, blue): before" in capsys.readouterr().out
