"""LIBERO closed loop (finetune/envs/libero.py): run only where hf-libero and the scene assets are (README,
"Simulators": a separate venv, tools/libero_assets.py, LIBERO's config.yaml `assets` entry or --env.assets-dir);
skipped with the reason elsewhere. The LeRobot comparison also needs lerobot 0.6.1 importable."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finetune.envs import EnvUnavailable, check_env, make_env


def _libero_missing() -> str | None:
    try:
        check_env("libero")
    except EnvUnavailable as err:
        return str(err)
    return None


MISSING = _libero_missing()
needs_libero = pytest.mark.skipif(MISSING is not None, reason=f"LIBERO unavailable: {MISSING}")


def test_assets_dir_that_is_not_libero_assets_is_one_line(tmp_path, monkeypatch):
    import finetune.envs.libero as libero

    monkeypatch.setattr(libero, "_assets_dir", None)
    (tmp_path / "scenes").mkdir()
    with pytest.raises((EnvUnavailable, ValueError)) as err:  # ValueError where hf-libero itself is missing
        check_env("libero", ["libero_spatial"], assets_dir=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    if "not installed" not in message:
        assert message.startswith(f"the assets folder {tmp_path} is not LIBERO's (it has no articulated_objects, "
                                  "stable_hope_objects,")
        assert "as --assets-dir (finetune-eval) or --env.assets-dir (training); make it with python " \
               "tools/libero_assets.py DIR" in message
    with pytest.raises(ValueError, match="an assets folder is for LIBERO only; drop it for metaworld"):
        check_env("metaworld", assets_dir=str(tmp_path))


@needs_libero
def test_libero_observations_equal_lerobots_env_and_processor():
    """Same task, seed and actions through LeRobot 0.6.1's own LiberoEnv + LiberoProcessorStep and through ours:
    every camera pixel and state value equal, at the reset and after each of 8 random actions, on two episodes."""
    try:
        from lerobot.envs.libero import LiberoEnv as LeRobotLiberoEnv
        from lerobot.envs.utils import preprocess_observation
        from lerobot.processor.env_processor import LiberoProcessorStep
    except (ImportError, SyntaxError) as err:  # lerobot 0.6 is Python 3.12 syntax; README says how to install it
        pytest.skip(f"lerobot 0.6.1 not importable ({type(err).__name__}: {err})")
    from libero.libero import benchmark

    size = 96
    theirs = LeRobotLiberoEnv(benchmark.get_benchmark_dict()["libero_spatial"](), task_id=0,
                              task_suite_name="libero_spatial", obs_type="pixels_agent_pos",
                              observation_width=size, observation_height=size)
    ours = make_env("libero", "libero_spatial:0", image_size=size)
    step = LiberoProcessorStep()

    def lerobot_policy_input(raw: dict) -> dict[str, torch.Tensor]:
        batched = _tree_map(lambda x: np.asarray(x)[None], raw)  # as a 1-env vector env gives it
        return step.observation(preprocess_observation(batched))

    def assert_equal(mine: dict[str, np.ndarray], lerobot: dict[str, torch.Tensor]) -> None:
        assert set(lerobot) == set(mine)
        for key in ("observation.images.image", "observation.images.image2"):  # LeRobot: (1, 3, H, W) in [0, 1]
            as_lerobot = torch.from_numpy(mine[key]).permute(2, 0, 1).float() / 255
            assert torch.equal(as_lerobot, lerobot[key][0]), key
        assert torch.equal(torch.from_numpy(mine["observation.state"]), lerobot["observation.state"][0]), (
            (torch.from_numpy(mine["observation.state"]) - lerobot["observation.state"][0]).tolist())

    actions = np.random.default_rng(0).uniform(-1, 1, (8, 7)).astype(np.float32)
    states = []
    try:
        for episode in range(2):  # LeRobot's episode k starts from init state k, ours from init state `seed`
            raw, _ = theirs.reset(seed=episode)
            mine, info = ours.reset(seed=episode)
            assert info["task"] == theirs.task_description
            assert_equal(mine, lerobot_policy_input(raw))
            states.append(mine["observation.state"])
            for action in actions:
                raw, _, done, _, _ = theirs.step(action)
                mine, _, terminated, _, _ = ours.step(action)
                assert_equal(mine, lerobot_policy_input(raw))
                assert terminated == done
            states.append(mine["observation.state"])
    finally:
        theirs.close()
        ours.close()
    assert mine["observation.state"].dtype == np.float32 and mine["observation.images.image"].shape == (size, size, 3)
    assert not np.array_equal(states[0], states[1])  # the actions moved the arm
    assert not np.array_equal(states[0], states[2])  # the two episodes start from different init states


def _tree_map(fn, tree):
    return {k: _tree_map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


@needs_libero
def test_eval_sim_libero_writes_table_json_and_video(tmp_path, capsys):
    """`finetune-eval sim --env libero --suite libero_spatial:0+1` with a tiny random SmolVLA on LIBERO's features."""
    from finetune import eval as evaluation
    from finetune.data import decode_video
    from finetune.demo import make_initial_policy
    from finetune.envs.libero import libero_assets_dir
    from finetune.policies.processor import save_stats

    cams = ["observation.images.image", "observation.images.image2"]
    features = {**{c: {"shape": [64, 64, 3]} for c in cams}, "observation.state": {"shape": [8]},
                "action": {"shape": [7]}}
    policy = make_initial_policy(tmp_path / "policy", SimpleNamespace(features=features, camera_keys=cams), seed=0)
    save_stats({"observation.state": {"mean": np.zeros(8), "std": np.ones(8)},
                "action": {"mean": np.zeros(7), "std": np.full(7, 0.2)}}, policy)
    out = tmp_path / "eval"
    evaluation.main(["sim", "--checkpoint", str(policy), "--env", "libero", "--suite", "libero_spatial:0+1",
                     "--episodes", "1", "--max-steps", "6", "--num-envs", "1", "--output-dir", str(out),
                     "--assets-dir", libero_assets_dir()])
    saved = json.loads((out / "sim_eval.json").read_text())
    assert saved["tasks"] == ["libero_spatial:0", "libero_spatial:1"] and saved["image_size"] == 64
    for task in saved["tasks"]:
        r = saved["per_task"][task]
        assert r["episodes"] == 1 and r["steps"] == [6] and r["seeds"] == [0] and r["successes"] == [False]
        frames, _ = decode_video(out / saved["videos"][task])
        assert frames.shape == (7, 64, 64, 3)  # the reset frame + 6 steps
    table = capsys.readouterr().out.splitlines()
    assert table[-5].split() == ["task", "success", "episodes", "mean", "steps"]
    assert table[-4].split() == ["libero_spatial:0", "0%", "1", "6.0"]
    assert table[-3].split() == ["libero_spatial:1", "0%", "1", "6.0"]


@needs_libero
def test_libero_task_index_out_of_range_is_one_line():
    with pytest.raises(ValueError, match=r"^LIBERO task 'libero_spatial:10': libero_spatial has tasks 0-9$"):
        make_env("libero", "libero_spatial:10")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@needs_libero
def test_training_flags_evaluate_in_libero(tmp_path, capsys):
    """`--env.type=libero --env.task=libero_spatial:0 --env.assets-dir DIR`: a 2-step LoRA run on a tiny LIBERO-shaped
    dataset (random frames) evaluates its policy closed loop in LIBERO at the end and logs the success rate."""
    from helpers import train_args

    from finetune import train
    from finetune.data import load_dataset_meta
    from finetune.data.writer import DatasetWriter, Episode
    from finetune.demo import make_initial_policy
    from finetune.envs.libero import libero_assets_dir
    from finetune.training.metrics import read_metrics

    rng = np.random.default_rng(0)
    writer = DatasetWriter(tmp_path / "data", fps=20, robot_type="panda", episodes_per_file=4)
    for _ in range(4):
        writer.add(Episode(task="pick up the black bowl", state=rng.normal(size=(12, 8)).astype(np.float32),
                           action=rng.uniform(-1, 1, (12, 7)).astype(np.float32),
                           frames={f"observation.images.{c}": rng.integers(0, 255, (12, 64, 64, 3), np.uint8)
                                   for c in ("image", "image2")}))
    data = writer.finish()
    policy = make_initial_policy(tmp_path / "policy", load_dataset_meta(data), seed=0)
    out = tmp_path / "run"
    summary = train.main(train_args(policy, data, out, "--steps", "2", "--env.type=libero",
                                    "--env.task=libero_spatial:0", "--env.episodes=1", "--env.max-steps=4",
                                    "--env.assets-dir", libero_assets_dir()))
    sim = [m for m in read_metrics(out / "metrics.jsonl") if "sim/success_rate" in m]
    assert [(m["step"], m["sim/success_rate"], m["sim/libero_spatial:0/success_rate"]) for m in sim] == [(2, 0.0, 0.0)]
    assert summary["sim_success_rate"] == 0.0
    assert "step 2: libero libero_spatial:0 success rate 0.0% (1 episodes)" in capsys.readouterr().out
