"""Meta-World (MuJoCo Sawyer arm, 50 tasks) as a gymnasium env with LeRobot's observation names.

Observation: `observation.images.<camera>` (H, W, 3) uint8 per camera, corner cameras turned upright, and
`observation.state` (float32): "agent" gives the hand position and gripper opening (4 values, LeRobot's agent_pos);
"objects" adds the object poses and the goal position (21 values); "full" gives Meta-World's whole 39-value vector
(hand, gripper, object poses, the previous frame's, the goal).
Action: 4 values in [-1, 1] (hand dx, dy, dz, gripper). Success: Meta-World's own `info["success"]`; the episode
terminates on it. Resets are seeded: `reset(seed=s)` gives the same object and goal positions every time.

Rendering is headless (MUJOCO_GL=egl, Mesa's software renderer when no GPU driver is present) and set up for
speed: no multisampling, no shadows, no reflections (about 10x faster per frame than Meta-World's defaults). A frame
still costs about 25x a physics step, so `step(action, observe=False)` skips the cameras (closed-loop evaluation asks
for them only when the policy plans its next chunk).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

SIM_INSTALL = "pip install -e '.[sim]'  (or ./setup.sh --dev)"
DEFAULT_CAMERAS = ("corner2",)
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
# "objects": this frame's hand, gripper and object poses plus the goal (fits SmolVLA's 32 state slots).
STATE_KINDS = {"agent": 4, "objects": 21, "full": 39}
DEFAULT_MAX_STEPS = 200  # the scripted experts need 44-111 steps on MT10; Meta-World allows 500

# One instruction per task, in plain words (the tokenizer sees these, so they say what to do, not the task id).
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the ring and put it on the peg",
    "basketball-v3": "pick up the ball and drop it through the hoop",
    "bin-picking-v3": "move the cube from one bin into the other bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button down from above",
    "button-press-topdown-wall-v3": "reach over the wall and press the button down from above",
    "button-press-v3": "push the button in from the front",
    "button-press-wall-v3": "reach past the wall and push the button in",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial a full turn",
    "disassemble-v3": "lift the ring off the peg",
    "door-close-v3": "swing the door shut",
    "door-lock-v3": "turn the door's lock down",
    "door-open-v3": "pull the door open by its handle",
    "door-unlock-v3": "turn the door's lock up",
    "hand-insert-v3": "move the hand into the hole in the table",
    "drawer-close-v3": "push the drawer shut",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet handle to open it",
    "faucet-close-v3": "turn the faucet handle to close it",
    "hammer-v3": "pick up the hammer and drive the nail in",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it on the target behind the wall",
    "pick-out-of-hole-v3": "lift the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it on the target",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate back out of the goal sideways",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "pull the peg out of the hole sideways",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "grab the stick and push the box with it",
    "stick-pull-v3": "grab the stick and pull the box with it",
    "push-v3": "push the puck to the target",
    "push-wall-v3": "push the puck around the wall to the target",
    "push-back-v3": "pull the puck back to the target",
    "reach-v3": "move the hand to the target",
    "reach-wall-v3": "reach over the wall to the target",
    "shelf-place-v3": "pick up the block and put it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table's edge",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window shut",
}
TASKS = tuple(INSTRUCTIONS)
# Meta-World's own task sets, by name (ML10's test tasks are held out from its train tasks).
TASK_SETS = {
    "MT10": ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
             "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3"),
    "ML10_train": ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-close-v3", "button-press-v3",
                   "peg-insert-side-v3", "window-open-v3", "sweep-v3", "basketball-v3"),
    "ML10_test": ("drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3", "lever-pull-v3"),
    "MT50": TASKS,
}


def import_metaworld():
    """Import Meta-World (and MuJoCo) on first use, rendering headless; a one-line error when the extra is missing."""
    from finetune.envs import EnvUnavailable

    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import metaworld  # noqa: F401
        import mujoco  # noqa: F401
    except ImportError as err:
        raise EnvUnavailable(f"Meta-World is not installed ({err.msg}): {SIM_INSTALL}") from None
    import metaworld.env_dict
    import metaworld.policies

    return metaworld


def check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in INSTRUCTIONS]
    if unknown:
        raise ValueError(f"unknown Meta-World task(s) {unknown}; known: {', '.join(TASKS)} "
                         f"(or a set: {', '.join(TASK_SETS)})")


def expand_tasks(spec: str) -> list[str]:
    """'push-v3', 'push-v3,reach-v3' or a task set name ('MT10', 'ML10_test', 'MT50') -> task names."""
    tasks: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        tasks += list(TASK_SETS.get(part, (part,)))
    check_tasks(tasks)
    return list(dict.fromkeys(tasks))


class FastRenderer:
    """Offscreen MuJoCo rendering of named cameras at one size, with the costly effects off."""

    def __init__(self, model, size: int):
        import mujoco

        model.vis.quality.offsamples = 0  # multisampling: the largest cost in software GL
        self.renderer = mujoco.Renderer(model, size, size)
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    def render(self, data, camera: str) -> np.ndarray:
        self.renderer.update_scene(data, camera=camera)
        image = self.renderer.render()
        if camera.startswith("corner"):  # these cameras are mounted upside down
            image = image[::-1, ::-1]
        return np.ascontiguousarray(image)

    def close(self) -> None:
        self.renderer.close()


class MetaWorldEnv(gym.Env):
    """One Meta-World task; each seeded reset draws the object and goal positions from the seed."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(self, task: str, image_size: int = 128, cameras: Sequence[str] = DEFAULT_CAMERAS,
                 state: str = "agent", max_steps: int = DEFAULT_MAX_STEPS, render_mode: str | None = "rgb_array"):
        check_tasks([task])
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown or not cameras:
            raise ValueError(f"unknown or no Meta-World camera(s) {unknown or list(cameras)}; choose from {CAMERAS}")
        if state not in STATE_KINDS:
            raise ValueError(f"unknown state kind {state!r}; choose from {sorted(STATE_KINDS)}")
        metaworld = import_metaworld()
        self.task_name = task
        self.task = INSTRUCTIONS[task]
        self.cameras = tuple(cameras)
        self.image_keys = tuple(f"observation.images.{c}" for c in self.cameras)
        self.state_kind = state
        self.image_size = image_size
        self.max_steps = min(max_steps, 500)
        self.render_mode = render_mode
        env = metaworld.env_dict.ALL_V3_ENVIRONMENTS[task]()
        # The goal is observable to the scripted expert; what the policy sees is chosen by `state` below.
        env._partially_observable = False
        del env.sawyer_observation_space  # a cached property that depends on the flag above
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True  # positions drawn from env.np_random, which reset(seed=...) reseeds
        env.max_path_length = self.max_steps + 1  # our own limit truncates first
        self.sim = env
        self.renderer = FastRenderer(env.model, image_size) if render_mode else None
        self.expert = metaworld.policies.ENV_POLICY_MAP[task]()
        self.raw_obs = np.zeros(39)
        self.steps = 0
        self.observation_space = spaces.Dict({
            **{k: spaces.Box(0, 255, (image_size, image_size, 3), np.uint8) for k in self.image_keys},
            "observation.state": spaces.Box(-np.inf, np.inf, (STATE_KINDS[state],), np.float32),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)

    renders_on_demand = True  # step() takes observe=False (see run_task)

    def _observation(self, images: bool = True) -> dict[str, np.ndarray]:
        state = {"agent": self.raw_obs[:4], "objects": np.concatenate([self.raw_obs[:18], self.raw_obs[36:]]),
                 "full": self.raw_obs}[self.state_kind]
        obs = {"observation.state": np.asarray(state, np.float32)}
        if self.renderer is not None and images:
            for camera, key in zip(self.cameras, self.image_keys):
                obs[key] = self.renderer.render(self.sim.data, camera)
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.sim.seed(seed)
        self.raw_obs, _ = self.sim.reset()
        self.steps = 0
        return self._observation(), {"task": self.task, "task_name": self.task_name, "success": False}

    def step(self, action, observe: bool = True):
        """Gymnasium's step; with observe=False the observation holds the state only (no camera is rendered)."""
        action = np.clip(np.asarray(action, np.float32).reshape(4), -1.0, 1.0)
        self.raw_obs, reward, _, _, info = self.sim.step(action)
        self.steps += 1
        success = bool(info["success"])
        info = {**info, "success": success, "is_success": success, "task": self.task, "task_name": self.task_name}
        return self._observation(observe), float(reward), success, self.steps >= self.max_steps, info

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state (it reads the full state, goal included)."""
        return np.clip(np.asarray(self.expert.get_action(self.raw_obs), np.float32), -1.0, 1.0)

    def render(self) -> np.ndarray:
        if self.renderer is None:
            raise RuntimeError("made with render_mode=None: no camera to render")
        return self.renderer.render(self.sim.data, self.cameras[0])

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
        self.sim.close()
