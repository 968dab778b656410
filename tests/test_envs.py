"""finetune.envs: Meta-World with LeRobot's names (seeded, upright, fast rendering), the rollout loop, the errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from finetune.envs import ENV_TYPES, EnvUnavailable, ReachEnv, check_env, default_tasks, make_env
from finetune.envs.rollout import check_policy_fits_env, run_closed_loop

pytest.importorskip("metaworld", reason="Meta-World not installed: pip install -e '.[sim]'")
pytestmark = pytest.mark.filterwarnings("ignore:Constant.*may be too high")  # the scripted experts' gains


def test_metaworld_observation_names_shapes_and_seeded_resets():
    env = make_env("metaworld", "push-v3", image_size=32, cameras=("corner2", "topview"))
    obs, info = env.reset(seed=3)
    assert set(obs) == {"observation.images.corner2", "observation.images.topview", "observation.state"}
    image = obs["observation.images.corner2"]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert obs["observation.state"].shape == (4,) and obs["observation.state"].dtype == np.float32
    assert env.task == info["task"] == "push the puck to the target" and env.action_space.shape == (4,)
    puck = env.raw_obs[4:7].copy()
    env.step(np.ones(4))
    again, _ = env.reset(seed=3)  # the same seed: the same puck position and the same images
    np.testing.assert_array_equal(env.raw_obs[4:7], puck)
    np.testing.assert_array_equal(again["observation.images.corner2"], obs["observation.images.corner2"])
    env.reset(seed=4)
    assert not np.allclose(env.raw_obs[4:7], puck)  # another seed: another position
    env.close()


def test_corner_cameras_are_turned_upright_and_rendering_is_fast_by_default():
    import mujoco

    env = make_env("metaworld", "reach-v3", image_size=32)
    obs, _ = env.reset(seed=0)
    assert env.sim.model.vis.quality.offsamples == 0
    flags = env.renderer.renderer.scene.flags
    assert not flags[mujoco.mjtRndFlag.mjRND_SHADOW] and not flags[mujoco.mjtRndFlag.mjRND_REFLECTION]
    raw = mujoco.Renderer(env.sim.model, 32, 32)
    raw.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    raw.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    raw.update_scene(env.sim.data, camera="corner2")
    np.testing.assert_array_equal(obs["observation.images.corner2"], raw.render()[::-1, ::-1])
    raw.close()
    env.close()


def test_expert_solves_push_and_success_comes_from_metaworld():
    env = make_env("metaworld", "push-v3", image_size=16, state="full")
    obs, _ = env.reset(seed=0)
    assert obs["observation.state"].shape == (39,)
    for step in range(200):
        obs, reward, terminated, truncated, info = env.step(env.expert_action())
        if terminated or truncated:
            break
    assert terminated and info["success"] is True and not truncated and step < 100
    env.close()


def test_closed_loop_replans_every_n_action_steps_and_counts_successes():
    calls = []

    def still(obs, task):  # never moves: no success, a new chunk every 5 steps
        calls.append(task)
        return np.zeros((8, 4), np.float32)

    result = run_closed_loop(still, "metaworld", ["drawer-open-v3"], 2, seed=0, n_action_steps=5, image_size=16,
                             max_steps=12, record_video_episodes=1)
    r = result["per_task"]["drawer-open-v3"]
    assert r["successes"] == [False, False] and r["steps"] == [12, 12] and r["seeds"] == [0, 1]
    assert len(calls) == 2 * 3 and set(calls) == {"pull the drawer open"}  # steps 0, 5, 10 of each episode
    frames = result["frames"]["drawer-open-v3"]
    assert len(frames) == 1 and frames[0].shape == (13, 16, 16, 3)  # the reset frame + one per step

    import metaworld.policies

    def expert(observations, tasks):  # the scripted expert from the full state, as 1-step chunks
        policy = metaworld.policies.ENV_POLICY_MAP["reach-v3"]()
        return np.stack([[policy.get_action(o["observation.state"].astype(np.float64))] for o in observations])

    result = run_closed_loop(expert, "metaworld", ["reach-v3"], 3, seed=5, n_action_steps=1, image_size=16,
                             batched=True, num_envs=2, env_kwargs={"state": "full"})
    assert result["per_task"]["reach-v3"]["successes"] == [True, True, True] and result["success_rate"] == 1.0


def test_closed_loop_renders_only_the_frames_the_policy_plans_from(monkeypatch):
    from finetune.envs.metaworld import FastRenderer, MetaWorldEnv

    renders = []
    real_render = FastRenderer.render
    monkeypatch.setattr(FastRenderer, "render", lambda self, data, cam: renders.append(cam) or real_render(self, data,
                                                                                                         cam))

    def run():
        seen = []

        def moving(observations, tasks):  # actions depend on the image, so a stale frame would change the episode
            seen.extend(o["observation.images.corner2"].copy() for o in observations)
            return np.stack([np.full((8, 4), o["observation.images.corner2"].mean() / 255 - 0.3, np.float32)
                             for o in observations])

        renders.clear()
        result = run_closed_loop(moving, "metaworld", ["reach-v3"], 2, seed=3, n_action_steps=4, image_size=16,
                                 max_steps=10, batched=True, num_envs=2)
        return result["per_task"]["reach-v3"], seen, len(renders)

    lazy, lazy_seen, lazy_renders = run()
    monkeypatch.setattr(MetaWorldEnv, "renders_on_demand", False)
    full, full_seen, full_renders = run()
    assert lazy["steps"] == full["steps"] == [10, 10] and len(lazy_seen) == len(full_seen) == 2 * 3
    assert all(np.array_equal(a, b) for a, b in zip(lazy_seen, full_seen))
    assert (lazy_renders, full_renders) == (2 * 3, 2 * 11)  # resets + steps 4 and 8, against every step


def test_reach_env_through_the_same_contract():
    env = make_env("reach", "green", image_size=64, seed=2)
    assert isinstance(env, ReachEnv) and env.task == "move to the green ball"
    result = run_closed_loop(lambda obs, task: np.zeros((4, 2), np.float32), "reach", ["red"], 2, n_action_steps=2,
                             image_size=64, max_steps=5)
    assert result["per_task"]["red"]["steps"] == [5, 5] and result["success_rate"] == 0.0


def test_unknown_env_task_camera_and_state_are_one_line_errors():
    assert ENV_TYPES == ("reach", "metaworld", "libero")
    with pytest.raises(ValueError, match=r"unknown env 'mujoco'; choose from reach, metaworld, libero"):
        check_env("mujoco")
    with pytest.raises(ValueError, match=r"unknown Meta-World task\(s\) \['psuh-v3'\]; known: assembly-v3"):
        check_env("metaworld", ["push-v3", "psuh-v3"])
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        default_tasks("metaworld", "MT10,nope-v3")
    assert default_tasks("metaworld", "ML10_test,push-v3")[-1] == "push-v3" and len(default_tasks("metaworld",
                                                                                                   "MT10")) == 10
    with pytest.raises(ValueError, match=r"unknown or no Meta-World camera\(s\) \['front'\]"):
        make_env("metaworld", "push-v3", cameras=("front",))
    with pytest.raises(ValueError, match="unknown state kind 'joints'"):
        make_env("metaworld", "push-v3", state="joints")


def test_policy_env_mismatch_names_what_differs():
    env = make_env("metaworld", "push-v3", image_size=16)
    with pytest.raises(ValueError, match=r"camera\(s\) \['observation.images.top'\] but the env gives "
                                         r"\['observation.images.corner2'\]"):
        check_policy_fits_env(env, ["observation.images.top"], 4, 4)
    with pytest.raises(ValueError, match="a state of 2 values but the env gives 4"):
        check_policy_fits_env(env, ["observation.images.corner2"], 2, 4)
    with pytest.raises(ValueError, match="outputs 7-dim actions but the env takes 4"):
        check_policy_fits_env(env, ["observation.images.corner2"], 4, 7)
    check_policy_fits_env(env, ["observation.images.corner2"], 4, 4)
    env.close()


def test_missing_simulator_extra_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "metaworld", None)  # as if the [sim] extra were not installed
    with pytest.raises(EnvUnavailable, match=r"^Meta-World is not installed .*pip install -e '\.\[sim\]'"):
        check_env("metaworld", ["push-v3"])
    with pytest.raises(EnvUnavailable, match=r"pip install -e '\.\[sim\]'"):
        make_env("metaworld", "push-v3")


def test_libero_without_hf_libero_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "libero", None)
    with pytest.raises(EnvUnavailable, match=r"^LIBERO is not installed .*pip install -e '\.\[libero\]'"):
        check_env("libero", ["libero_spatial"])
    with pytest.raises(ValueError, match="unknown LIBERO task"):
        check_env("libero", ["libero_nope"])
