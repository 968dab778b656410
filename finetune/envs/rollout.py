"""Closed-loop episodes: a policy that predicts action chunks drives simulated envs, replanning every n_action_steps.

The policy is a plain function (observation, instruction) -> (chunk, action_dim) actions in robot units, so the
evaluation command (a Predictor), training's periodic evaluation (the in-memory model) and tests share this loop.
A batched function (list of observations, list of instructions) -> (B, chunk, action_dim) lets the envs of one
task step in lockstep with one policy call for every env that needs a new chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from finetune.envs import make_env

ActionChunkFn = Callable[[dict[str, np.ndarray], str], np.ndarray]
BatchActionChunkFn = Callable[[list[dict[str, np.ndarray]], list[str]], np.ndarray]


def check_policy_fits_env(env, cameras: Sequence[str], state_dim: int, action_dim: int) -> None:
    """One-line ValueError when a policy's cameras, state size or action size differ from what the env gives."""
    keys = set(env.observation_space.spaces)
    missing = [c for c in cameras if c not in keys]
    env_cameras = sorted(k for k in keys if k.startswith("observation.images."))
    if missing:
        raise ValueError(f"the policy expects camera(s) {missing} but the env gives {env_cameras}; evaluate with "
                         "matching cameras (or a rename map)")
    env_state = env.observation_space["observation.state"].shape[0]
    if env_state != state_dim:
        raise ValueError(f"the policy expects a state of {state_dim} values but the env gives {env_state}")
    env_action = env.action_space.shape[0]
    if env_action != action_dim:
        raise ValueError(f"the policy outputs {action_dim}-dim actions but the env takes {env_action}")


def _one_by_one(act: ActionChunkFn) -> BatchActionChunkFn:
    return lambda observations, tasks: np.stack([np.asarray(act(o, t)) for o, t in zip(observations, tasks)])


def run_task(act_batch: BatchActionChunkFn, env_type: str, task: str, episodes: int, *, seed: int = 0,
             n_action_steps: int, image_size: int = 128, max_steps: int | None = None, record_video_episodes: int = 0,
             num_envs: int = 10, env_kwargs: dict[str, Any] | None = None, progress: Callable[[int], Any] | None = None
             ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Episodes seed, seed+1, ... of one task in waves of `num_envs` lockstepped envs; (result, recorded frames)."""
    kw = dict(env_kwargs or {})
    if max_steps is not None:
        kw["max_steps"] = max_steps
    envs = [make_env(env_type, task, image_size=image_size, **kw) for _ in range(max(1, min(num_envs, episodes)))]
    successes, steps, frames = [False] * episodes, [0] * episodes, []
    tick = time.perf_counter()
    try:
        for first in range(0, episodes, len(envs)):
            wave = list(range(first, min(first + len(envs), episodes)))
            obs, instructions = {}, {}
            for j, e in enumerate(wave):
                obs[e], info = envs[j].reset(seed=seed + e)
                instructions[e] = envs[j].task
            recorded = {e: [_camera_frame(obs[e])] for e in wave if e < record_video_episodes}
            queues: dict[int, list[np.ndarray]] = {e: [] for e in wave}
            running = list(wave)
            while running:
                need = [e for e in running if not queues[e]]
                if need:
                    chunks = act_batch([obs[e] for e in need], [instructions[e] for e in need])
                    for e, chunk in zip(need, chunks):
                        queues[e] = list(np.asarray(chunk)[:n_action_steps])
                for e in list(running):
                    env, action = envs[e - first], queues[e].pop(0)
                    if getattr(env, "renders_on_demand", False):  # render only what the policy or a video will see
                        step = env.step(action, observe=not queues[e] or e in recorded)
                    else:
                        step = env.step(action)
                    obs[e], _, terminated, truncated, info = step
                    steps[e] += 1
                    if e in recorded:
                        recorded[e].append(_camera_frame(obs[e]))
                    if terminated or truncated:
                        successes[e] = bool(info["success"])
                        running.remove(e)
                        if progress is not None:
                            progress(1)
            frames += [np.stack(recorded[e]) for e in sorted(recorded)]
    finally:
        for env in envs:
            env.close()
    result = {"success_rate": float(np.mean(successes)), "episodes": episodes, "successes": successes,
              "seeds": [seed + e for e in range(episodes)], "steps": steps, "mean_steps": float(np.mean(steps)),
              "seconds": round(time.perf_counter() - tick, 2)}
    return result, frames


def _camera_frame(obs: dict[str, np.ndarray]) -> np.ndarray:
    key = next(k for k in sorted(obs) if k.startswith("observation.images."))
    return obs[key]


def run_closed_loop(act: ActionChunkFn | BatchActionChunkFn, env_type: str, tasks: Sequence[str], episodes: int, *,
                    seed: int = 0, n_action_steps: int, image_size: int = 128, max_steps: int | None = None,
                    record_video_episodes: int = 0, batched: bool = False, num_envs: int = 10,
                    env_kwargs: dict[str, Any] | None = None, progress: Callable[[int], Any] | None = None) -> dict:
    """Seeded episodes per task (episode i resets with seed + i), executing the first n_action_steps actions of each
    predicted chunk before predicting again; an episode ends on success or after max_steps.

    `act` takes one (observation, instruction), or lists of them when `batched`. Returns
    {"per_task": {task: {"success_rate", "episodes", "successes", "seeds", "steps", ...}},
     "success_rate": mean over tasks, "frames": {task: [(T, H, W, 3) uint8 per recorded episode]}}.
    """
    if n_action_steps < 1:
        raise ValueError(f"n_action_steps must be at least 1, got {n_action_steps}")
    act_batch = act if batched else _one_by_one(act)
    per_task, frames = {}, {}
    for task in tasks:
        per_task[task], frames[task] = run_task(
            act_batch, env_type, task, episodes, seed=seed, n_action_steps=n_action_steps, image_size=image_size,
            max_steps=max_steps, record_video_episodes=record_video_episodes, num_envs=num_envs,
            env_kwargs=env_kwargs, progress=progress)
    return {"per_task": per_task, "success_rate": float(np.mean([r["success_rate"] for r in per_task.values()])),
            "frames": frames}
