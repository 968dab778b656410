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
from finetune.inference.predict import Predictor


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
    """The demo's own report (finetune.demo), with known policies: the base stands still (0%), the fine-tuned one is
    the oracle (100%); the summary, closed_loop.json and the printed line must carry exactly those rates."""
    from finetune import demo

    trained = []

    still = OraclePredictor()
    still.predict_batch = lambda obs, generator=None: np.zeros((len(obs), 10, 2), np.float32)
    loaded = []

    def from_checkpoint(checkpoint, base=None, use_trained_weights=True, **kwargs):
        loaded.append((str(checkpoint), base, use_trained_weights))
        return OraclePredictor() if use_trained_weights else still

    monkeypatch.setattr(demo, "prepare_assets", lambda cfg: (policy_dir, dataset_root))
    last = {"checkpoint": str(lora_run / "checkpoints/last")}
    monkeypatch.setattr(train, "run", lambda cfg: trained.append(cfg) or last)
    monkeypatch.setattr(Predictor, "from_checkpoint", from_checkpoint)
    out = tmp_path / "demo"
    summary = demo.main(["--train.output-dir", str(out), "--rollout-episodes", "3"])
    assert [(c.policy.path, c.dataset.roots, c.peft.r, c.steps) for c in trained] == \
        [(str(policy_dir), (str(dataset_root),), 16, 600)]  # the demo's LoRA recipe on its assets, through train.run
    assert summary["success_before"] == 0.0 and summary["success_after"] == 1.0
    assert sorted(w for *_, w in loaded) == [False, True] and {b for _, b, _ in loaded} == {str(policy_dir)}
    saved = json.loads((out / "eval" / "closed_loop.json").read_text())
    assert saved["colors"] == ["red", "green", "blue"] and saved["before"]["episodes"] == 3
    assert saved["before"]["successes"] == 0 and saved["after"]["successes"] == 3
    assert (out / "eval" / "rollout_after.gif").is_file() and (out / "eval" / "rollout_before.gif").is_file()
    assert "closed-loop success over 3 seeded episodes (red, green, blue): before 0% -> after 100%" in \
        capsys.readouterr().out


# --- closed loop in Meta-World --------------------------------------------------------------------------------------

def tiny_metaworld_policy(folder, state_dim=4, action_dim=4, camera="observation.images.corner2"):
    """A randomly initialized tiny SmolVLA (the demo's) with Meta-World's features and made-up stats."""
    from finetune.demo import make_initial_policy
    from finetune.policies.processor import save_stats

    features = {camera: {"shape": [64, 64, 3]}, "observation.state": {"shape": [state_dim]},
                "action": {"shape": [action_dim]}}
    make_initial_policy(folder, SimpleNamespace(features=features, camera_keys=[camera]), seed=0)
    stats = {"observation.state": {"mean": np.zeros(state_dim), "std": np.ones(state_dim)},
             "action": {"mean": np.zeros(action_dim), "std": np.full(action_dim, 0.5)}}
    save_stats(stats, folder)
    return folder


def test_eval_metaworld_writes_table_json_plot_and_video(tmp_path, capsys):
    pytest.importorskip("metaworld", reason="Meta-World not installed: pip install -e '.[sim]'")
    from finetune.data import decode_video

    policy = tiny_metaworld_policy(tmp_path / "policy")
    out = tmp_path / "eval"
    summary = evaluation.main(["--checkpoint", str(policy), "--env", "metaworld", "--tasks", "reach-v3",
                               "--episodes", "2", "--max-steps", "8", "--output-dir", str(out), "--num-envs", "2"])
    saved = json.loads((out / "sim_eval.json").read_text())
    r = saved["per_task"]["reach-v3"]
    assert r["episodes"] == 2 and r["steps"] == [8, 8] and r["seeds"] == [0, 1] and len(r["successes"]) == 2
    assert saved["success_rate"] == summary["success_rate"] == r["success_rate"] == np.mean(r["successes"])
    assert saved["n_action_steps"] == 5 and saved["env_options"]["state"] == "agent"  # from the policy's config
    frames, _ = decode_video(out / saved["videos"]["reach-v3"])
    assert frames.shape == (9, 64, 64, 3)  # one episode: the reset frame + 8 steps
    with Image.open(out / "success.png") as png:
        assert png.format == "PNG"
    table = capsys.readouterr().out
    assert "reach-v3" in table and f"{100 * r['success_rate']:.0f}%" in table


@pytest.mark.parametrize("args, message", [
    (["--env", "mujoco", "--tasks", "push-v3"], "error: unknown env 'mujoco'; choose from reach, metaworld, libero"),
    (["--env", "metaworld", "--tasks", "psuh-v3"], "error: unknown Meta-World task(s) ['psuh-v3']"),
    (["--env", "metaworld", "--tasks", "push-v3", "--cameras", "topview"],
     "error: the policy expects camera(s) ['observation.images.corner2'] but the env gives "
     "['observation.images.topview']"),
])
def test_eval_sim_errors_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    pytest.importorskip("metaworld", reason="Meta-World not installed: pip install -e '.[sim]'")
    policy = tiny_metaworld_policy(tmp_path / "policy")
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--checkpoint", str(policy), "--episodes", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(message), err


def test_eval_refuses_a_policy_whose_action_or_state_size_differs(tmp_path, capsys):
    pytest.importorskip("metaworld", reason="Meta-World not installed: pip install -e '.[sim]'")
    wide = tiny_metaworld_policy(tmp_path / "wide", action_dim=7)
    with pytest.raises(SystemExit):
        evaluation.main(["--checkpoint", str(wide), "--env", "metaworld", "--tasks", "push-v3"])
    assert "error: the policy outputs 7-dim actions but the env takes 4" in capsys.readouterr().err
    odd = tiny_metaworld_policy(tmp_path / "odd", state_dim=6)
    with pytest.raises(SystemExit):
        evaluation.main(["--checkpoint", str(odd), "--env", "metaworld", "--tasks", "push-v3"])
    assert "error: the policy expects a state of 6 values but the env gives 4" in capsys.readouterr().err


def test_eval_names_the_missing_simulator_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "metaworld", None)
    with pytest.raises(SystemExit):
        evaluation.main(["--checkpoint", str(tmp_path / "none"), "--env", "metaworld", "--tasks", "push-v3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Meta-World is not installed" in err[0] and "pip install -e '.[sim]'" in err[0]


def test_help_names_both_modes_and_each_mode_has_its_own_flags(capsys):
    import pytest

    from finetune.eval import main, with_mode

    for argv in ([], ["--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "dataset" in out and "sim" in out and "Closed loop in a simulator" in out
    with pytest.raises(SystemExit):
        main(["sim", "--help"])
    out = capsys.readouterr().out
    assert "--suite" in out and "--rollout-episodes" not in out
    with pytest.raises(SystemExit):
        main(["--env", "libero", "--help"])  # the mode word left out: --env picks it
    assert "--suite" in capsys.readouterr().out
    assert with_mode(["--checkpoint", "c", "--env", "metaworld"]) == ["sim", "--checkpoint", "c", "--env", "metaworld"]
    assert with_mode(["--checkpoint", "c", "--env", "reach"]) == ["dataset", "--checkpoint", "c"]
    assert with_mode(["--checkpoint", "c"]) == ["dataset", "--checkpoint", "c"]
