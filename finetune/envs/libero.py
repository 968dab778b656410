"""LIBERO (robosuite, Franka arm) through hf-libero, with the observations LeRobot's LIBERO env gives a policy.

Observation, as LeRobot 0.6's LiberoEnv plus its LiberoProcessorStep: `observation.images.image` (agentview) and
`observation.images.image2` (wrist), both rotated 180 degrees; `observation.state` = end-effector position (3),
axis-angle orientation (3, from the float32 quaternion) and gripper joints (2), float32; action: 7 relative values at
20 Hz. Episode i of a task starts from the suite's i-th fixed initial state (LIBERO's evaluation protocol), then 10
no-op steps let the objects settle.

Scene assets: --env.assets-dir, else the `assets` entry of LIBERO's config.yaml, else where hf-libero keeps them
(inside the package, or ~/.cache/libero/assets after its Hub download). tools/libero_assets.py builds the folder
from LIBERO's GitHub repository without the Hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import yaml
from gymnasium import spaces

LIBERO_INSTALL = "pip install -e '.[libero]' (best in its own venv: README, Simulators)"
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# Step limits per suite, as LIBERO's evaluation uses them (the longest demonstration plus a margin).
MAX_STEPS = {"libero_spatial": 280, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
CAMERAS = {"agentview_image": "observation.images.image", "robot0_eye_in_hand_image": "observation.images.image2"}
NUM_WAIT_STEPS = 10  # objects settle after a reset; the policy starts acting after these no-op steps
NOOP_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # no motion, gripper open
CONTROL_FREQ = 20  # Hz, robosuite's default and LeRobot's --env.fps for LIBERO
ASSET_FOLDERS = ("articulated_objects", "scenes", "stable_hope_objects", "stable_scanned_objects", "textures",
                 "turbosquid_objects")
HUB_CACHE = Path.home() / ".cache" / "libero" / "assets"  # where hf-libero's Hub download puts them
GET_ASSETS = ("pass LIBERO's assets folder DIR as --assets-dir (finetune-eval) or --env.assets-dir (training); "
              "make it with python tools/libero_assets.py DIR --repo <clone of github.com/Lifelong-Robot-Learning/"
              "LIBERO>, or hf-libero's Hub download (README, Simulators)")
_assets_dir: str | None = None  # set by use_assets_dir (the --env.assets-dir flag)


def use_assets_dir(path: str | os.PathLike | None) -> None:
    """Take LIBERO's scene assets from this folder (None: the config file's or hf-libero's own)."""
    global _assets_dir
    _assets_dir = None if path is None else str(Path(path).expanduser().resolve())


def missing_asset_folders(path: str | os.PathLike) -> list[str]:
    return [name for name in ASSET_FOLDERS if not (Path(path) / name).is_dir()]


def find_assets(config: dict[str, Any], package_dir: Path) -> str:
    """The assets folder to use, or EnvUnavailable naming the folders looked at and how to get the assets."""
    from finetune.envs import EnvUnavailable

    if _assets_dir is not None:
        missing = missing_asset_folders(_assets_dir)
        if missing:
            raise EnvUnavailable(f"the assets folder {_assets_dir} is not LIBERO's (it has no "
                                 f"{', '.join(missing)}); {GET_ASSETS}")
        return _assets_dir
    candidates = [config.get("assets"), package_dir / "assets", HUB_CACHE]
    for path in candidates:
        if path and not missing_asset_folders(path):
            return str(path)
    raise EnvUnavailable(f"LIBERO's scene assets are missing (looked in {', '.join(str(p) for p in candidates if p)}"
                         f"); {GET_ASSETS}")


def libero_config(package_dir: Path) -> dict[str, Any]:
    """LIBERO's config.yaml (LIBERO_CONFIG_PATH or ~/.libero). hf-libero asks on stdin when it is missing, so then
    one naming the package's own bddl/init folders is written to ~/.cache/finetune/libero and used instead."""
    folder = Path(os.environ.get("LIBERO_CONFIG_PATH", Path.home() / ".libero"))
    if not (folder / "config.yaml").is_file():
        folder = Path.home() / ".cache" / "finetune" / "libero"
        folder.mkdir(parents=True, exist_ok=True)
        config = {"benchmark_root": str(package_dir), "bddl_files": str(package_dir / "bddl_files"),
                  "init_states": str(package_dir / "init_files"), "datasets": str(package_dir.parent / "datasets"),
                  "assets": str(package_dir / "assets")}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        os.environ["LIBERO_CONFIG_PATH"] = str(folder)
    return yaml.safe_load((folder / "config.yaml").read_text()) or {}


def libero_assets_dir() -> str:
    """The scene assets folder LIBERO envs will use (EnvUnavailable when hf-libero or the assets are missing)."""
    import_libero()
    import libero.libero as libero_paths

    return libero_paths._assets_path_cache


def import_libero():
    """hf-libero's modules with the assets folder found, or EnvUnavailable saying how to install it or get them."""
    from finetune.envs import EnvUnavailable

    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        spec = importlib.util.find_spec("libero.libero")
    except ImportError as err:
        raise EnvUnavailable(f"LIBERO is not installed ({err.msg}): {LIBERO_INSTALL}") from None
    if spec is None or spec.origin is None:
        raise EnvUnavailable(f"LIBERO is not installed (no module named 'libero.libero'): {LIBERO_INSTALL}")
    package_dir = Path(spec.origin).parent
    assets = find_assets(libero_config(package_dir), package_dir)
    try:
        import libero.libero as libero_paths
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as err:
        raise EnvUnavailable(f"LIBERO is not installed ({err.msg}): {LIBERO_INSTALL}") from None
    # hf-libero's get_assets_path() returns this cached folder, so its scenes load from `assets`, never the Hub
    libero_paths._assets_path_cache = assets
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
    """Task `<suite>:<index>` of a LIBERO suite; reset(seed=i) starts from the suite's i-th initial state (mod 50)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_FREQ}

    def __init__(self, task: str, image_size: int = 256, max_steps: int | None = None,
                 assets_dir: str | os.PathLike | None = None, **_: Any):
        suite, _, index = task.partition(":")
        if suite not in SUITES or not index.isdigit():
            raise ValueError(f"unknown LIBERO task {task!r}; use <suite>:<index>, suites {', '.join(SUITES)}")
        if assets_dir is not None:
            use_assets_dir(assets_dir)
        benchmark, get_libero_path, OffScreenRenderEnv = import_libero()
        task_suite = benchmark.get_benchmark_dict()[suite]()
        if int(index) >= task_suite.n_tasks:
            raise ValueError(f"LIBERO task {task!r}: {suite} has tasks 0-{task_suite.n_tasks - 1}")
        spec = task_suite.get_task(int(index))
        self.task = spec.language
        self.task_name = task
        self.init_states = load_init_states(get_libero_path("init_states"), spec.problem_folder, spec.init_states_file)
        bddl = os.path.join(get_libero_path("bddl_files"), spec.problem_folder, spec.bddl_file)
        self.sim = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=image_size, camera_widths=image_size,
                                      control_freq=CONTROL_FREQ, hard_reset=True)
        self.sim.reset()  # as LeRobot's env does once when it builds the simulator
        self.max_steps = max_steps or MAX_STEPS[suite]
        self.steps = 0
        self.observation_space = spaces.Dict({
            **{k: spaces.Box(0, 255, (image_size, image_size, 3), np.uint8) for k in CAMERAS.values()},
            "observation.state": spaces.Box(-np.inf, np.inf, (8,), np.float32),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.sim.seed(seed or 0)
        self.sim.reset()
        raw = self.sim.set_init_state(self.init_states[(seed or 0) % len(self.init_states)])
        for _ in range(NUM_WAIT_STEPS):
            raw, _, _, _ = self.sim.step(list(NOOP_ACTION))
        for robot in self.sim.robots:
            robot.controller.use_delta = True  # relative actions, LeRobot's default control mode
        self.steps = 0
        return libero_observation(raw), {"task": self.task, "task_name": self.task_name, "success": False}

    def step(self, action):
        raw, reward, done, info = self.sim.step(np.asarray(action, np.float64).reshape(7))
        self.steps += 1
        success = bool(self.sim.check_success())
        info = {**info, "success": success, "is_success": success, "task": self.task}
        return libero_observation(raw), float(reward), success or bool(done), self.steps >= self.max_steps, info

    def render(self) -> np.ndarray:
        return libero_observation(self.sim.env._get_observations())["observation.images.image"]

    def close(self) -> None:
        self.sim.close()


def load_init_states(root: str, problem_folder: str, file_name: str) -> np.ndarray:
    """A task's fixed initial simulator states (a pickled numpy array, which torch.load reads only with
    weights_only=False: the file is LIBERO's own, shipped in the package)."""
    import torch

    return torch.load(os.path.join(root, problem_folder, os.path.basename(file_name)), weights_only=False)


def libero_observation(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """robosuite's raw observation -> the policy's: cameras rotated 180 degrees, the 8-value float32 state."""
    obs = {key: np.ascontiguousarray(raw[name][::-1, ::-1]) for name, key in CAMERAS.items()}
    obs["observation.state"] = np.concatenate([
        np.asarray(raw["robot0_eef_pos"], np.float32), quat_to_axis_angle(raw["robot0_eef_quat"]),
        np.asarray(raw["robot0_gripper_qpos"], np.float32)])
    return obs


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis * angle, float32. Torch's float32 ops in LeRobot's LiberoProcessorStep order,
    so the state is bit-equal to LeRobot's (numpy's float32 arccos differs from torch's in the last bit)."""
    import torch

    q = torch.as_tensor(np.asarray(quat), dtype=torch.float32)
    w = q[3].clamp(-1.0, 1.0)
    sin_half = torch.sqrt(torch.clamp(1.0 - w * w, min=0.0))
    if sin_half <= 1e-10:
        return np.zeros(3, np.float32)
    return (q[:3] / sin_half * (2.0 * torch.acos(w))).numpy()
