"""A small 2-D "move to the named ball" task and a writer for it in LeRobotDataset v3.0 format.

The right action depends on both the image (where the balls are) and the instruction (which color), so a policy
that learns it must use both. Scene sampling, dynamics, rendering and the scripted expert are plain functions,
independent of file writing, so a simulator can reuse them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from finetune.data.stats import array_stats, image_stats, to_json
from finetune.data.video import DEFAULT_CODEC, codec_name, encode_video

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
    "cyan": (40, 220, 230),
}
BACKGROUND = (20, 20, 30)
AGENT_COLOR = (255, 255, 255)

NUM_BALLS = 3
GRID_CELLS = 4  # balls sit in the bins of a 4x4 grid over the world, one ball per bin, centered
POSITION_RANGE = 0.8  # the agent starts anywhere in [-0.8, 0.8]^2
BALL_RADIUS = 0.17  # world units (the world is [-1, 1]^2); about size / 12 pixels
MAX_STEP = 0.12  # per-component action clip
EXPERT_SPEED = 0.1
EXPERT_NOISE_STD = 0.005
EXPERT_STOP_RADIUS = 0.03
SUCCESS_RADIUS = 0.1  # the cross's center well inside the ball (BALL_RADIUS)

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


def instruction(color: str) -> str:
    return f"move to the {color} ball"


@dataclass
class Scene:
    """Static part of an episode: ball colors and positions, which ball is the target, the agent's start."""

    ball_colors: tuple[str, ...]
    ball_positions: np.ndarray  # (num_balls, 2) float32
    target: int  # index into ball_colors
    agent_start: np.ndarray  # (2,) float32

    @property
    def target_color(self) -> str:
        return self.ball_colors[self.target]

    @property
    def target_position(self) -> np.ndarray:
        return self.ball_positions[self.target]

    @property
    def instruction(self) -> str:
        return instruction(self.target_color)


def _check_colors(colors: Sequence[str], what: str) -> None:
    unknown = [c for c in colors if c not in COLORS]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {sorted(COLORS)}")


def bin_centers() -> np.ndarray:
    """(GRID_CELLS**2, 2) world coordinates of the bin centers, row by row."""
    c = (np.arange(GRID_CELLS, dtype=np.float32) + 0.5) / GRID_CELLS * 2 - 1
    return np.stack(np.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 2)


def sample_scene(rng: np.random.Generator, target_color: str, distractor_colors: Sequence[str] | None = None) -> Scene:
    """Three balls of distinct colors (one is `target_color`) in three distinct bins; the agent's start."""
    _check_colors([target_color], "target color")
    pool = [c for c in (distractor_colors if distractor_colors is not None else COLORS) if c != target_color]
    _check_colors(pool, "distractor colors")
    if len(set(pool)) < NUM_BALLS - 1:
        raise ValueError(f"need {NUM_BALLS - 1} distractor colors other than {target_color!r}, got {pool}")
    distractors = [str(c) for c in rng.choice(sorted(set(pool)), size=NUM_BALLS - 1, replace=False)]
    colors = [target_color, *distractors]
    order = rng.permutation(NUM_BALLS)
    colors = [colors[k] for k in order]
    positions = bin_centers()[rng.choice(GRID_CELLS**2, size=NUM_BALLS, replace=False)]
    target = colors.index(target_color)
    # Start the agent away from the target so every episode needs real motion.
    while True:
        agent = rng.uniform(-POSITION_RANGE, POSITION_RANGE, size=2)
        if np.linalg.norm(agent - positions[target]) >= 2 * BALL_RADIUS:
            break
    return Scene(tuple(colors), np.asarray(positions, np.float32), target, agent.astype(np.float32))


def step(agent_xy: np.ndarray, action: np.ndarray) -> np.ndarray:
    """Move the agent by the action, clipped to MAX_STEP per component; positions stay in [-1, 1]."""
    move = np.clip(np.asarray(action, np.float32), -MAX_STEP, MAX_STEP)
    return np.clip(np.asarray(agent_xy, np.float32) + move, -1.0, 1.0).astype(np.float32)


def expert_action(scene: Scene, agent_xy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Head for the target at speed min(dist, EXPERT_SPEED) plus small noise; zero once within the stop radius."""
    delta = scene.target_position - np.asarray(agent_xy, np.float32)
    dist = float(np.linalg.norm(delta))
    if dist <= EXPERT_STOP_RADIUS:
        return np.zeros(2, np.float32)
    move = delta / dist * min(dist, EXPERT_SPEED) + rng.normal(0.0, EXPERT_NOISE_STD, size=2)
    return move.astype(np.float32)


def is_success(scene: Scene, agent_xy: np.ndarray) -> bool:
    return float(np.linalg.norm(scene.target_position - np.asarray(agent_xy))) <= SUCCESS_RADIUS


def rollout_expert(scene: Scene, episode_length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(states, actions), each (episode_length, 2) float32: action t is taken in state t."""
    states = np.empty((episode_length, 2), np.float32)
    actions = np.empty((episode_length, 2), np.float32)
    xy = scene.agent_start
    for t in range(episode_length):
        states[t] = xy
        actions[t] = expert_action(scene, xy, rng)
        xy = step(xy, actions[t])
    return states, actions


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # World coordinates of pixel centers; y points up.
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return c[None, :], -c[:, None]


def render(scene: Scene, agent_xy: np.ndarray, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8: dark background, balls as filled discs, the agent as a white cross on top."""
    x, y = _pixel_grid(size)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for color, (bx, by) in zip(scene.ball_colors, scene.ball_positions):
        img[(x - bx) ** 2 + (y - by) ** 2 <= BALL_RADIUS**2] = COLORS[color]
    ax, ay = float(agent_xy[0]), float(agent_xy[1])
    arm = max(0.09, 3.5 / size)  # world units, at least a few pixels long at small sizes
    half = max(0.02, 1.0 / size)  # half thickness: at least 2 pixels wide
    dx, dy = np.abs(x - ax), np.abs(y - ay)
    img[((dx <= half) & (dy <= arm)) | ((dy <= half) & (dx <= arm))] = AGENT_COLOR
    return img


def episode_rng(seed: int, episode_index: int) -> np.random.Generator:
    """Independent generator per episode, so any episode can be regenerated on its own."""
    return np.random.default_rng([seed, episode_index])


def synthetic_episode(
    seed: int,
    episode_index: int,
    target_color: str,
    distractor_colors: Sequence[str] | None = None,
    episode_length: int = 30,
) -> tuple[Scene, np.ndarray, np.ndarray]:
    """The scene, states and actions of one episode of `make_synthetic_dataset`."""
    rng = episode_rng(seed, episode_index)
    scene = sample_scene(rng, target_color, distractor_colors)
    states, actions = rollout_expert(scene, episode_length, rng)
    return scene, states, actions


def _vector_stats(x: np.ndarray) -> dict[str, list]:
    return to_json({"x": array_stats(x)})["x"]


def _image_stats(frames: np.ndarray) -> dict[str, list]:
    """Per-channel stats of uint8 frames scaled to [0, 1], shaped (3, 1, 1) (finetune-stats' estimator)."""
    return to_json({"x": image_stats(frames)})["x"]


def _fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_synthetic_dataset(
    root: str | Path,
    *,
    num_episodes: int,
    target_colors: Sequence[str],
    distractor_colors: Sequence[str] | None = None,
    episode_length: int = 30,
    image_size: int = 64,
    fps: int = 10,
    seed: int = 0,
    camera_key: str = "observation.images.top",
    use_videos: bool = True,
    episodes_per_file: int = 20,
    robot_type: str = "synthetic_reach",
    action_sign: float = 1.0,
) -> Path:
    """Write a complete LeRobotDataset v3.0 of expert episodes; episode i targets target_colors[i % len].

    `action_sign=-1` records a robot whose motor axes are wired inverted: the world, the motion and the position
    readings are the same, the commands that produce them are negated (ReachEnv(action_sign=-1) is that robot).
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; pick a new folder for the synthetic dataset")
    if num_episodes < 1 or episode_length < 1 or episodes_per_file < 1:
        raise ValueError("num_episodes, episode_length and episodes_per_file must be positive")
    if not target_colors:
        raise ValueError("target_colors must name at least one color")
    _check_colors(target_colors, "target colors")
    colors = list(dict.fromkeys(target_colors))  # task_index = position of the color here
    tasks = [instruction(c) for c in colors]

    states, actions, frames, task_ids, episode_rows = [], [], [], [], []
    for ep in range(num_episodes):
        color = target_colors[ep % len(target_colors)]
        scene, s, a = synthetic_episode(seed, ep, color, distractor_colors, episode_length)
        states.append(s)
        actions.append((action_sign * a).astype(np.float32))
        frames.append(np.stack([render(scene, xy, image_size) for xy in s]))
        task_ids.append(colors.index(color))
    all_states, all_actions = np.concatenate(states), np.concatenate(actions)
    all_frames = np.concatenate(frames)
    n = len(all_states)

    video_encoder = None
    for file_no, first in enumerate(range(0, num_episodes, episodes_per_file)):
        eps = range(first, min(first + episodes_per_file, num_episodes))
        chunk, file = divmod(file_no, CHUNKS_SIZE)
        lo, hi = first * episode_length, eps[-1] * episode_length + episode_length
        frame_index = np.tile(np.arange(episode_length, dtype=np.int64), len(eps))
        columns = {
            "observation.state": _fixed_list(all_states[lo:hi]),
            "action": _fixed_list(all_actions[lo:hi]),
        }
        if not use_videos:
            columns[camera_key] = pa.array(
                [{"bytes": _png(img), "path": None} for img in all_frames[lo:hi]],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            )
        columns |= {
            "timestamp": pa.array((frame_index / fps).astype(np.float32)),
            "frame_index": pa.array(frame_index),
            "episode_index": pa.array(np.repeat(np.arange(eps[0], eps[-1] + 1, dtype=np.int64), episode_length)),
            "index": pa.array(np.arange(lo, hi, dtype=np.int64)),
            "task_index": pa.array(np.repeat(np.asarray([task_ids[e] for e in eps], np.int64), episode_length)),
        }
        path = root / DATA_PATH.format(chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), path)
        if use_videos:
            video_file = root / VIDEO_PATH.format(video_key=camera_key, chunk_index=chunk, file_index=file)
            video_encoder = encode_video(all_frames[lo:hi], video_file, fps)
        for k, ep in enumerate(eps):
            row = {
                "episode_index": ep,
                "tasks": [tasks[task_ids[ep]]],
                "length": episode_length,
                "data/chunk_index": chunk,
                "data/file_index": file,
                "dataset_from_index": ep * episode_length,
                "dataset_to_index": (ep + 1) * episode_length,
            }
            if use_videos:
                start = k * episode_length / fps
                row |= {
                    f"videos/{camera_key}/chunk_index": chunk,
                    f"videos/{camera_key}/file_index": file,
                    f"videos/{camera_key}/from_timestamp": start,
                    f"videos/{camera_key}/to_timestamp": start + episode_length / fps,
                }
            row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
            episode_rows.append(row)

    episodes_file = root / "meta/episodes/chunk-000/file-000.parquet"
    episodes_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), episodes_file)
    pq.write_table(
        pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks)}),
        root / "meta/tasks.parquet",
    )

    camera = {"shape": [image_size, image_size, 3], "names": ["height", "width", "channels"]}
    if use_videos:
        camera = {"dtype": "video", **camera}
        camera["info"] = {
            "video.height": image_size,
            "video.width": image_size,
            "video.codec": codec_name(video_encoder or DEFAULT_CODEC),
            "video.pix_fmt": "yuv420p",
            "video.is_depth_map": False,
            "video.fps": fps,
            "video.channels": 3,
            "has_audio": False,
        }
    else:
        camera = {"dtype": "image", **camera}
    features = {
        "observation.state": {"dtype": "float32", "shape": [2], "names": ["x", "y"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]},
        camera_key: camera,
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "synthetic_action_sign": float(action_sign),  # read back by the closed-loop env (finetune.eval)
        "total_episodes": num_episodes,
        "total_frames": n,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{num_episodes}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if use_videos else None,
        "features": features,
    }
    stats = {
        "observation.state": _vector_stats(all_states),
        "action": _vector_stats(all_actions),
        camera_key: _image_stats(all_frames),
    }
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    (root / "meta/stats.json").write_text(json.dumps(stats, indent=4))
    return root
