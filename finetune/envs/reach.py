"""The synthetic "move to the <color> ball" task as a gymnasium environment, for closed-loop evaluation.

It is built on the same functions that wrote the demo datasets (finetune.data.synthetic): the same scene sampling,
dynamics, success test and renderer, so the policy sees the images, state and instruction it was trained on. The
observation uses LeRobot's keys: `observation.images.<camera>` (H, W, 3) uint8 and `observation.state` (x, y); the
instruction is `info["task"]` (and `env.task`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from finetune.data import synthetic
from finetune.data.synthetic import COLORS, MAX_STEP, Scene

ENV_ID = "finetune/Reach-v0"
DEFAULT_CAMERA = "observation.images.top"


class ReachEnv(gym.Env):
    """Move the white cross onto the ball named in the instruction; success within SUCCESS_RADIUS ends the episode.

    `reset(seed=s, options={"target_color": c})` gives a reproducible scene; without a color one of `target_colors`
    is drawn. Reward is 1 on the success step, else 0. Episodes are cut after `max_steps` steps.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, target_colors: Sequence[str] = ("red", "green", "blue"),
                 distractor_colors: Sequence[str] | None = None, image_size: int = 64, max_steps: int = 40,
                 camera_key: str = DEFAULT_CAMERA, render_mode: str | None = "rgb_array", action_sign: float = 1.0):
        unknown = [c for c in (*target_colors, *(distractor_colors or ())) if c not in COLORS]
        if unknown or not target_colors:
            raise ValueError(f"unknown or no target colors {unknown or list(target_colors)}; choose from "
                             f"{sorted(COLORS)}")
        self.target_colors = tuple(target_colors)
        self.action_sign = float(action_sign)  # -1: a robot whose motor axes are inverted (commands negated)
        self.distractor_colors = None if distractor_colors is None else tuple(distractor_colors)
        self.image_size = image_size
        self.max_steps = max_steps
        self.camera_key = camera_key
        self.render_mode = render_mode
        self.observation_space = spaces.Dict({
            camera_key: spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "observation.state": spaces.Box(-1.0, 1.0, (2,), np.float32),
        })
        self.action_space = spaces.Box(-MAX_STEP, MAX_STEP, (2,), np.float32)
        self.scene: Scene | None = None
        self.agent = np.zeros(2, np.float32)
        self.steps = 0

    @property
    def task(self) -> str:
        if self.scene is None:
            raise RuntimeError("call reset() first")
        return self.scene.instruction

    def _observation(self) -> dict[str, np.ndarray]:
        return {self.camera_key: self.render(), "observation.state": self.agent.copy()}

    def _info(self) -> dict[str, Any]:
        return {"task": self.task, "target_color": self.scene.target_color, "is_success": self.success,
                "success": self.success,
                "distance": float(np.linalg.norm(self.scene.target_position - self.agent))}

    @property
    def success(self) -> bool:
        return synthetic.is_success(self.scene, self.agent)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        color = (options or {}).get("target_color")
        if color is None:
            color = self.target_colors[int(self.np_random.integers(len(self.target_colors)))]
        self.scene = synthetic.sample_scene(self.np_random, color, self.distractor_colors)
        self.agent = self.scene.agent_start.copy()
        self.steps = 0
        return self._observation(), self._info()

    def step(self, action):
        if self.scene is None:
            raise RuntimeError("call reset() first")
        command = self.action_sign * np.asarray(action, np.float32).reshape(2)
        self.agent = synthetic.step(self.agent, command)
        self.steps += 1
        success = self.success
        return self._observation(), float(success), success, self.steps >= self.max_steps, self._info()

    def render(self) -> np.ndarray:
        return synthetic.render(self.scene, self.agent, self.image_size)


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point=ReachEnv)
