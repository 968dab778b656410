"""Record demonstrations: Meta-World's scripted experts on chosen tasks, written as a LeRobotDataset v3.0.

    finetune-record --tasks push-v3,reach-v3 --episodes 20 --root data/mw_push_reach [--image-size 128]

Episode i of a task is reset with seed `seed + i` (kept in the episode's metadata row as `seed`); an episode the
expert does not finish within --max-steps is dropped and counted in the summary. Each recorded episode stops on the
step that succeeds. Frames: the cameras' images at each step, the state and the expert's action taken there.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import tyro
from tqdm.auto import tqdm

from finetune import _quiet  # noqa: F401 - first: silences notices raised while peft imports bitsandbytes
from finetune.data.writer import DatasetWriter, Episode
from finetune.entry import console_script, exit_on
from finetune.envs import EnvUnavailable, make_env
from finetune.envs.metaworld import DEFAULT_CAMERAS, DEFAULT_MAX_STEPS, STATE_KINDS, expand_tasks

FPS = 80  # Meta-World's control rate (frame_skip 5 x 2.5 ms)
AGENT_STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper"]
ACTION_NAMES = ["dx", "dy", "dz", "gripper"]


@dataclass(frozen=True)
class RecordConfig:
    root: str
    """New dataset folder (must not exist or be empty)."""
    tasks: str = "push-v3"
    """Meta-World task names, comma-separated, or a set (MT10, ML10_train, ML10_test, MT50)."""
    episodes: int = 10
    """Successful episodes wanted per task (seeds seed, seed+1, ... are tried; failures are dropped)."""
    seed: int = 0
    image_size: int = 128
    cameras: tuple[str, ...] = DEFAULT_CAMERAS
    state: str = "agent"
    """observation.state: "agent" (hand xyz + gripper, LeRobot's agent_pos), "objects" (+ object poses and goal, 21
    values) or "full" (Meta-World's 39 values)."""
    max_steps: int = DEFAULT_MAX_STEPS
    max_attempts_factor: int = 2
    """Try at most episodes x this many seeds per task."""
    episodes_per_file: int = 50


def expert_episode(env, seed: int) -> tuple[Episode | None, int]:
    """Run the scripted expert from a seeded reset; the episode up to its success step, or None if it failed."""
    obs, _ = env.reset(seed=seed)
    states, actions, frames = [], [], {k: [] for k in env.image_keys}
    for _ in range(env.max_steps):
        action = env.expert_action()
        states.append(obs["observation.state"])
        actions.append(action)
        for k in frames:
            frames[k].append(obs[k])
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated:
            episode = Episode(task=env.task, state=np.stack(states), action=np.stack(actions),
                              frames={k: np.stack(v) for k, v in frames.items()},
                              metadata={"seed": seed, "task_name": env.task_name})
            return episode, len(actions)
        if truncated:
            break
    return None, len(actions)


def record(cfg: RecordConfig) -> dict[str, Any]:
    tasks = expand_tasks(cfg.tasks)
    if cfg.episodes < 1:
        raise ValueError(f"--episodes must be at least 1, got {cfg.episodes}")
    names = AGENT_STATE_NAMES if cfg.state == "agent" else [f"mw{i}" for i in range(STATE_KINDS[cfg.state])]
    writer = DatasetWriter(cfg.root, fps=FPS, robot_type="sawyer_metaworld", state_names=names,
                           action_names=ACTION_NAMES, episodes_per_file=cfg.episodes_per_file,
                           info_extra={"metaworld_state": cfg.state, "metaworld_tasks": tasks})
    summary: dict[str, Any] = {"root": cfg.root, "tasks": {}}
    bar = tqdm(total=cfg.episodes * len(tasks), desc="recording", unit="episode", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant.*may be too high")  # the experts' gains, by design
        for task in tasks:
            env = make_env("metaworld", task, image_size=cfg.image_size, cameras=cfg.cameras, state=cfg.state,
                           max_steps=cfg.max_steps)
            kept, failed, steps = 0, [], []
            for seed in range(cfg.seed, cfg.seed + cfg.episodes * cfg.max_attempts_factor):
                episode, n = expert_episode(env, seed)
                if episode is None:
                    failed.append(seed)
                    continue
                writer.add(episode)
                kept, steps = kept + 1, steps + [n]
                bar.update(1)
                if kept == cfg.episodes:
                    break
            env.close()
            summary["tasks"][task] = {"recorded": kept, "failed": len(failed), "failed_seeds": failed,
                                      "mean_steps": float(np.mean(steps)) if steps else 0.0}
    bar.close()
    writer.finish()
    summary["episodes"] = sum(t["recorded"] for t in summary["tasks"].values())
    summary["dropped"] = sum(t["failed"] for t in summary["tasks"].values())
    summary["frames"] = writer.total_frames
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"recorded {summary['episodes']} episodes ({summary['frames']} frames) to {summary['root']}; "
          f"dropped {summary['dropped']} failed expert episode(s)")
    for task, t in summary["tasks"].items():
        print(f"  {task:<30} {t['recorded']:>4} kept  {t['failed']:>3} failed  {t['mean_steps']:6.1f} steps/episode")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = tyro.cli(RecordConfig, args=argv, description="Record scripted-expert demos of Meta-World tasks.")
    with exit_on(ValueError, FileExistsError, EnvUnavailable):
        summary = record(cfg)
    print_summary(summary)
    return summary


cli = console_script(main)


if __name__ == "__main__":
    main()
