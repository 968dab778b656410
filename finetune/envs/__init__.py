"""Simulated tasks as gymnasium envs, with LeRobot's observation names.

- "reach": the project's synthetic "move to the <color> ball" task (no extra needed);
- "metaworld": Meta-World's 50 MuJoCo tasks (extra `[sim]`), rendered headless and fast;
- "libero": LIBERO's suites through hf-libero (extra `[libero]`, scene assets in a folder: see libero.py).

Simulator packages are imported only when an env is made, so this package imports without them; a missing one
raises EnvUnavailable with the install line. Training may import this package (simulation, not evaluation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gymnasium as gym

from finetune.envs.reach import DEFAULT_CAMERA, ENV_ID, ReachEnv

# MuJoCo picks its GL backend when first imported: headless EGL unless the user chose one (glfw, osmesa).
os.environ.setdefault("MUJOCO_GL", "egl")

ENV_TYPES: tuple[str, ...] = ("reach", "metaworld", "libero")
REACH_TASK_PREFIX = "move to the "


class EnvUnavailable(RuntimeError):
    """A simulator whose extra or assets are missing; the message says which and how to get them."""


def _check_type(env_type: str) -> None:
    if env_type not in ENV_TYPES:
        raise ValueError(f"unknown env {env_type!r}; choose from {', '.join(ENV_TYPES)}")


def default_tasks(env_type: str, suite_or_task: str) -> list[str]:
    """Expand a LeRobot-style task value: 'push-v3', 'push-v3,reach-v3', 'MT10', 'libero_spatial', 'red,green'."""
    _check_type(env_type)
    if env_type == "metaworld":
        from finetune.envs.metaworld import expand_tasks

        return expand_tasks(suite_or_task)
    if env_type == "libero":
        from finetune.envs.libero import suite_tasks

        return [t for part in suite_or_task.split(",") if part.strip() for t in suite_tasks(part.strip())]
    from finetune.data.synthetic import COLORS

    colors = [c.strip() for c in suite_or_task.split(",") if c.strip()] or ["red", "green", "blue"]
    unknown = [c for c in colors if c not in COLORS]
    if unknown:
        raise ValueError(f"unknown reach task color(s) {unknown}; choose from {sorted(COLORS)}")
    return colors


def check_env(env_type: str, tasks: Sequence[str] | None = None, assets_dir: str | None = None) -> None:
    """ValueError for an unknown env or task names, EnvUnavailable for a missing extra or assets; builds nothing.
    `assets_dir` (LIBERO only) is where the scene assets are, for every LIBERO env this process makes."""
    _check_type(env_type)
    if assets_dir is not None and env_type != "libero":
        raise ValueError(f"an assets folder is for LIBERO only; drop it for {env_type}")
    if env_type == "metaworld":
        from finetune.envs.metaworld import check_tasks, import_metaworld

        check_tasks(tasks or [])
        import_metaworld()
    elif env_type == "libero":
        from finetune.envs.libero import SUITES, import_libero, use_assets_dir

        bad = [t for t in tasks or [] if t.partition(":")[0] not in SUITES]
        if bad:
            raise ValueError(f"unknown LIBERO task(s) {bad}; use a suite ({', '.join(SUITES)}) or <suite>:<index>")
        if assets_dir is not None:
            use_assets_dir(assets_dir)
        import_libero()
    else:
        default_tasks("reach", ",".join(tasks or []))


def make_env(env_type: str, task: str, *, image_size: int = 128, seed: int | None = None, **kw) -> gym.Env:
    """One env of one task. Observations: 'observation.images.<cam>' (H, W, 3) uint8 and 'observation.state'
    (float32); the instruction in env.task; success in info['success']. `seed` seeds the first reset."""
    _check_type(env_type)
    if env_type == "metaworld":
        from finetune.envs.metaworld import MetaWorldEnv

        env = MetaWorldEnv(task, image_size=image_size, **kw)
    elif env_type == "libero":
        from finetune.envs.libero import LiberoEnv

        env = LiberoEnv(task, image_size=image_size, **kw)
    else:
        env = ReachEnv(tuple(default_tasks("reach", task)), image_size=image_size, **kw)
    if seed is not None:
        env.reset(seed=seed)
    return env


__all__ = ["DEFAULT_CAMERA", "ENV_ID", "ENV_TYPES", "EnvUnavailable", "ReachEnv", "check_env", "default_tasks",
           "make_env"]
