"""LIBERO (robosuite, Franka arm) through hf-libero, with the observation names LeRobot's LIBERO env uses.

For evaluating real SmolVLA / pi0 / pi0.5 checkpoints on a user's machine: hf-libero downloads its scene assets from
the Hub the first time, so this needs a network once (and is not exercised by this project's offline tests).

Observation: `observation.images.image` (agent view) and `observation.images.image2` (wrist), both turned upright,
`observation.state` = end-effector position (3), axis-angle orientation (3), gripper joints (2); action: 7 values.
Episode i of a task starts from the suite's i-th fixed initial state (LIBERO's own evaluation protocol).
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

LIBERO_INSTALL = "pip install -e '.[libero]'"
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# Step limits per suite, as LIBERO's evaluation uses them (the longest demonstration plus a margin).
MAX_STEPS = {"libero_spatial": 280, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
CAMERAS = {"agentview_image": "observation.images.image", "robot0_eye_in_hand_image": "observation.images.image2"}
NUM_WAIT_STEPS = 10  # objects settle after a reset; the policy starts acting after these no-op steps


def import_libero():
    """hf-libero's modules, or EnvUnavailable saying how to install it and get its assets."""
    from finetune.envs import EnvUnavailable

    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as err:
        raise EnvUnavailable(f"LIBERO is not installed ({err.msg}): {LIBERO_INSTALL}") from None
    except Exception as err:  # hf-libero fetches its assets on import/first use; offline that fails here
        raise EnvUnavailable(f"LIBERO's scene assets are missing ({type(err).__name__}: {err}); hf-libero downloads "
                             "them from the Hugging Face Hub on first use: run once with network access") from None
    assets = get_libero_path("assets")
    if not assets or not os.path.isdir(assets):
        raise EnvUnavailable(f"LIBERO's scene assets are missing ({assets}); hf-libero downloads them from the Hub on "
                             "first use: run once with network access")
    return benchmark, get_libero_path, OffScreenRenderEnv


def suite_tasks(suite: str) -> list[str]:
    """The task names of a suite ('libero_spatial:3' picks its task 3)."""
    name, _, index = suite.partition(":")
    if name not in SUITES:
        raise ValueError(f"unknown LIBERO suite {name!r}; choose from {', '.join(SUITES)}")
    benchmark, _, _ = import_libero()
    names = benchmark.get_benchmark_dict()[name]().get_task_names()
    chosen = range(len(names)) if not index else [int(i) for i in index.split("+")]
    return [f"{name}:{i}" for i in chosen]


class LiberoEnv(gym.Env):
    """Task `<suite>:<index>` of a LIBERO suite; reset(seed=i) starts from the suite's i-th initial state."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task: str, image_size: int = 256, max_steps: int | None = None, **_: Any):
        suite, _, index = task.partition(":")
        if suite not in SUITES or not index.isdigit():
            raise ValueError(f"unknown LIBERO task {task!r}; use <suite>:<index>, suites {', '.join(SUITES)}")
        benchmark, get_libero_path, OffScreenRenderEnv = import_libero()
        task_suite = benchmark.get_benchmark_dict()[suite]()
        spec = task_suite.get_task(int(index))
        self.task = spec.language
        self.task_name = task
        self.init_states = task_suite.get_task_init_states(int(index))
        bddl = os.path.join(get_libero_path("bddl_files"), spec.problem_folder, spec.bddl_file)
        self.sim = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=image_size, camera_widths=image_size)
        self.max_steps = max_steps or MAX_STEPS[suite]
        self.steps = 0
        self.observation_space = spaces.Dict({
            **{k: spaces.Box(0, 255, (image_size, image_size, 3), np.uint8) for k in CAMERAS.values()},
            "observation.state": spaces.Box(-np.inf, np.inf, (8,), np.float32),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)

    def _observation(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {key: np.ascontiguousarray(raw[name][::-1, ::-1]) for name, key in CAMERAS.items()}
        obs["observation.state"] = np.concatenate([
            raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"],
        ]).astype(np.float32)
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.sim.seed(seed or 0)
        self.sim.reset()
        raw = self.sim.set_init_state(self.init_states[(seed or 0) % len(self.init_states)])
        for _ in range(NUM_WAIT_STEPS):
            raw, _, _, _ = self.sim.step([0.0] * 6 + [-1.0])
        self.steps = 0
        return self._observation(raw), {"task": self.task, "task_name": self.task_name, "success": False}

    def step(self, action):
        raw, reward, done, info = self.sim.step(np.asarray(action, np.float64).reshape(7))
        self.steps += 1
        success = bool(self.sim.check_success())
        info = {**info, "success": success, "is_success": success, "task": self.task}
        return self._observation(raw), float(reward), success, self.steps >= self.max_steps, info

    def close(self) -> None:
        self.sim.close()


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis * angle, as robosuite's and LeRobot's LIBERO state."""
    quat = np.asarray(quat, np.float64)
    w = np.clip(quat[3], -1.0, 1.0)
    sin_half = np.sqrt(max(1.0 - w * w, 0.0))
    if sin_half < 1e-8:
        return np.zeros(3)
    return quat[:3] / sin_half * (2.0 * np.arccos(w))
