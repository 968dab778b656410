"""Does the fine-tune help? Offline action errors on held-out episodes, and closed-loop rollouts in simulation.

    finetune-eval dataset --checkpoint runs/my_task/checkpoints/last [--dataset-root DIR] [--rollout-episodes 50]
    finetune-eval sim --checkpoint POLICY --env metaworld --tasks push-v3,reach-v3 --episodes 50
    finetune-eval sim --checkpoint POLICY --env libero --suite libero_spatial

(The mode word may be left out: `--env metaworld|libero` selects `sim`, anything else `dataset`.)

Offline: action MSE and L1 per dimension (robot units), per position in the chunk and per chunk, on the episodes the
run held out (the last --dataset.eval-episodes). Closed loop, for the synthetic reach task (finetune.envs): N seeded
episodes, each executing the first n_action_steps of every predicted chunk before predicting again (receding horizon,
as LeRobot), reporting the success rate, with a GIF of some rollouts and a plot of the run's metrics.jsonl. Everything
is written to the run folder's eval/.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import tyro

from finetune import _quiet  # noqa: F401 - first: silences notices raised while peft imports bitsandbytes
from finetune.config import read_train_config
from finetune.data import COLORS, DEFAULT_TOLERANCE_S, LeRobotDataset, load_dataset_meta
from finetune.data.multi import parse_episodes, split_selection
from finetune.data.v21 import ensure_v30
from finetune.entry import console_script, exit_on
from finetune.envs import ReachEnv
from finetune.inference.predict import Predictor
from finetune.policies.base import ACTION, OBS_STATE
from finetune.training.metrics import CLOSED_LOOP_FILE, OFFLINE_METRICS_FILE, read_metrics, run_dir_of

TASK_RE = re.compile(r"move to the (\w+) ball")
GIF_SCALE = 4


# --- offline ----------------------------------------------------------------------------------------------------------

def heldout_episodes(checkpoint: Path, total: int) -> list[int]:
    """The episodes the run held out (its last --dataset.eval-episodes); all of them when it held none out."""
    train_cfg = read_train_config(checkpoint)
    n = train_cfg.dataset.eval_episodes if train_cfg is not None else 0
    # the selection of the run's first dataset (the one finetune-eval reads by default)
    selected = (parse_episodes(train_cfg.dataset.episodes or (), max(len(train_cfg.dataset.roots), 1))[0]
                if train_cfg is not None else None)
    if n <= 0 or n >= len(selected or range(total)):
        print(f"eval: the run held no episodes out; evaluating on all {total} (they may include training data)",
              file=sys.stderr)
        return list(range(total))
    return split_selection(range(total), selected, n)[1]  # the last n of the run's --dataset.episodes selection


@torch.no_grad()
def offline_metrics(predictor: Predictor, dataset_root: str | Path, episodes: Sequence[int] | None = None,
                    batch_size: int = 32, max_frames: int | None = None, seed: int = 0,
                    tolerance_s: float = DEFAULT_TOLERANCE_S) -> dict[str, Any]:
    """Action errors of the predicted chunks against the recorded ones (padding past an episode's end excluded)."""
    meta = load_dataset_meta(dataset_root)
    dataset = LeRobotDataset(dataset_root, predictor.chunk_size, episodes=episodes,
                             keys=[*meta.camera_keys, OBS_STATE, ACTION], tolerance_s=tolerance_s)
    indices = np.arange(len(dataset))
    if max_frames is not None and max_frames < len(indices):
        indices = np.linspace(0, len(dataset) - 1, max_frames).round().astype(int)
    generator = torch.Generator().manual_seed(seed)
    horizon, dims = predictor.chunk_size, predictor.action_dim
    sq, ab, count = np.zeros(dims), np.zeros(dims), np.zeros(dims)
    step_sq, step_count = np.zeros(horizon), np.zeros(horizon)
    norm_sq, chunk_mse = 0.0, []
    normalizer = predictor.processor.normalizer
    for start in range(0, len(indices), batch_size):
        samples = [dataset[int(i)] for i in indices[start : start + batch_size]]
        predicted = torch.from_numpy(predictor.predict_batch(samples, generator)).double()
        target = torch.stack([s[ACTION] for s in samples]).double()
        valid = ~torch.stack([s["action_is_pad"] for s in samples])  # (B, H)
        mask = valid[..., None].double()
        err = (predicted - target) * mask
        sq += (err**2).sum((0, 1)).numpy()
        ab += err.abs().sum((0, 1)).numpy()
        count += mask.sum((0, 1)).numpy()
        step_sq += (err**2).sum(-1).sum(0).numpy()
        step_count += (mask.sum(-1) * dims).sum(0).numpy()
        per_chunk = (err**2).sum((1, 2)) / (mask.sum((1, 2)) * dims).clamp_min(1)
        chunk_mse += per_chunk.tolist()
        norm_err = (normalizer.normalize(ACTION, predicted.float()) - normalizer.normalize(ACTION, target.float()))
        norm_sq += float(((norm_err.double() * mask) ** 2).sum())
    names = meta.features[ACTION].get("names") or [f"a{i}" for i in range(dims)]
    chunk_mse = np.asarray(chunk_mse)
    return {
        "frames": int(len(indices)),
        "episodes": sorted({int(e) for e in (episodes if episodes is not None else range(meta.total_episodes))}),
        "action_names": list(names),
        "action_mse": float(sq.sum() / count.sum()),
        "action_l1": float(ab.sum() / count.sum()),
        "action_mse_per_dim": (sq / count).tolist(),
        "action_l1_per_dim": (ab / count).tolist(),
        "action_mse_per_chunk_step": (step_sq / np.maximum(step_count, 1)).tolist(),
        "chunk_mse": {"mean": float(chunk_mse.mean()), "median": float(np.median(chunk_mse)),
                      "p90": float(np.quantile(chunk_mse, 0.9)), "max": float(chunk_mse.max())},
        "action_mse_normalized": norm_sq / float(count.sum()),
    }


# --- closed loop ------------------------------------------------------------------------------------------------------

def predictor_policy(predictor: Predictor, seed: int = 0):
    """A Predictor as the rollout loop's batched policy: (observations, instructions) -> (B, chunk, action_dim) actions
    in robot units; the sampling noise comes from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)

    def act(observations: list[dict[str, np.ndarray]], tasks: list[str]) -> np.ndarray:
        return predictor.predict_batch([{**o, "task": t} for o, t in zip(observations, tasks)], generator)

    return act


@dataclass(frozen=True)
class RolloutSettings:
    colors: tuple[str, ...]
    """Target colors; episode i targets colors[i % len]."""
    episodes: int = 50
    seed: int = 0
    """Episode i resets the environment with seed + i; the sampling noise is seeded with it too."""
    n_action_steps: int | None = None
    """Actions executed from each predicted chunk before predicting again; None: the policy config's."""
    max_steps: int = 40
    image_size: int = 64
    camera_key: str = "observation.images.top"
    record: int = 4
    """Episodes whose frames are kept for the GIF."""
    action_sign: float = 1.0
    """Command sign of the simulated robot (-1: inverted motor axes), as recorded in the dataset's info.json."""
    batch_size: int = 64
    """Environments stepped in lockstep per policy call."""


def settings_from_dataset(dataset_root: str | Path, colors: Sequence[str] | None = None, **kwargs: Any
                          ) -> RolloutSettings:
    """Rollouts that match a synthetic reach dataset: its camera name and image size, the colors of its tasks."""
    meta = load_dataset_meta(dataset_root)
    if not meta.camera_keys:
        raise ValueError(f"{dataset_root} has no camera; the closed-loop task renders one")
    camera = meta.camera_keys[0]
    if colors is None:
        found = [m.group(1) for m in map(TASK_RE.fullmatch, meta.tasks) if m]
        colors = [c for c in found if c in COLORS]
        if not colors:
            raise ValueError(f"{dataset_root}: no task reads 'move to the <color> ball' ({meta.tasks[:3]}); the "
                             "closed-loop rollout simulates only the synthetic reach task")
    kwargs.setdefault("action_sign", float(meta.info.get("synthetic_action_sign", 1.0)))
    return RolloutSettings(colors=tuple(colors), image_size=int(meta.features[camera]["shape"][0]), camera_key=camera,
                           **kwargs)


def rollout(predictor: Predictor, settings: RolloutSettings) -> dict[str, Any]:
    """Run the seeded episodes in lockstep (one batched policy call for every environment that needs a new chunk)."""
    n = settings.episodes
    k = settings.n_action_steps or getattr(predictor.config, "n_action_steps", None) or predictor.chunk_size
    k = max(1, min(k, predictor.chunk_size))
    envs = [ReachEnv(settings.colors, image_size=settings.image_size, max_steps=settings.max_steps,
                     camera_key=settings.camera_key, action_sign=settings.action_sign) for _ in range(n)]
    resets = [env.reset(seed=settings.seed + i, options={"target_color": settings.colors[i % len(settings.colors)]})
              for i, env in enumerate(envs)]
    obs = [o for o, _ in resets]
    tasks = [info["task"] for _, info in resets]
    queues: list[list[np.ndarray]] = [[] for _ in range(n)]
    done, success, steps = [False] * n, [False] * n, [0] * n
    frames = [[env.render()] for env in envs[: settings.record]]
    generator = torch.Generator().manual_seed(settings.seed)
    calls, tick = 0, time.perf_counter()
    while not all(done):
        need = [i for i in range(n) if not done[i] and not queues[i]]
        for start in range(0, len(need), settings.batch_size):
            group = need[start : start + settings.batch_size]
            chunks = predictor.predict_batch([{**obs[i], "task": tasks[i]} for i in group], generator)
            calls += 1
            for i, chunk in zip(group, chunks):
                queues[i] = list(chunk[:k])
        for i in range(n):
            if done[i]:
                continue
            obs[i], _, terminated, truncated, info = envs[i].step(queues[i].pop(0))
            steps[i] += 1
            if i < settings.record:
                frames[i].append(envs[i].render())
            if terminated or truncated:
                done[i], success[i] = True, bool(info["is_success"])
    colors_of = [settings.colors[i % len(settings.colors)] for i in range(n)]
    return {
        "success_rate": float(np.mean(success)),
        "episodes": n,
        "successes": int(sum(success)),
        "mean_steps": float(np.mean(steps)),
        "per_color": {c: float(np.mean([s for s, ci in zip(success, colors_of) if ci == c]))
                      for c in dict.fromkeys(colors_of)},
        "n_action_steps": k,
        "policy_calls": calls,
        "seconds": round(time.perf_counter() - tick, 2),
        "success": success,
        "frames": frames,
        "tasks": tasks[: settings.record],
    }


def public(result: dict[str, Any]) -> dict[str, Any]:
    """A rollout result without its frames (for JSON)."""
    return {k: v for k, v in result.items() if k not in ("frames",)}


def save_gif(result: dict[str, Any], path: Path, scale: int = GIF_SCALE, fps: int = 10, hold_ms: int = 1000
             ) -> Path | None:
    """The recorded episodes one after another, upscaled; each episode's last frame has a green (success) or red
    border and is held for `hold_ms`."""
    from PIL import Image, ImageDraw

    images, durations = [], []
    tasks = result.get("tasks") or [""] * len(result["frames"])
    for frames, ok, task in zip(result["frames"], result["success"], tasks):
        color = np.array([40, 200, 60] if ok else [220, 40, 40], np.uint8)
        for t, frame in enumerate(frames):
            big = np.kron(frame, np.ones((scale, scale, 1), np.uint8))
            last = t == len(frames) - 1
            if last:
                big[:scale], big[-scale:], big[:, :scale], big[:, -scale:] = color, color, color, color
            image = Image.fromarray(big)
            ImageDraw.Draw(image).text((2 * scale, 2 * scale), f"{task}  t={t}", fill=(230, 230, 230))
            images.append(image)
            durations.append(hold_ms if last else int(1000 / fps))
    if not images:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)
    return path


def plot_metrics(run_dir: Path, path: Path, closed_loop: dict[str, Any] | None = None) -> Path | None:
    """Training loss and held-out action MSE from the run's metrics.jsonl (and closed-loop success) as one PNG."""
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
    loss = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    mse = [(r["step"], r["eval/action_mse"]) for r in rows if "eval/action_mse" in r]
    panels = 2 + bool(closed_loop)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    for ax, series, title in ((axes[0], loss, "training loss"), (axes[1], mse, "held-out action MSE")):
        if series:
            ax.plot(*zip(*series), marker="o" if len(series) < 20 else None, markersize=3)
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if closed_loop:
        names = [n for n in ("before", "after") if n in closed_loop]
        rates = [100 * closed_loop[n]["success_rate"] for n in names]
        bars = axes[2].bar(names, rates, color=["#999999", "#2a7ab9"][: len(names)])
        axes[2].bar_label(bars, fmt="%.0f%%")
        axes[2].set_ylim(0, 105)
        axes[2].set_title(f"closed-loop success ({closed_loop[names[-1]]['episodes']} episodes)")
    fig.suptitle(str(run_dir), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the command ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str
    """Adapter checkpoint (output_dir/checkpoints/last) or a merged / full policy folder."""
    base: str | None = None
    """Base policy for an adapter checkpoint; default: the one in its train_config.json."""
    dataset_root: str | None = None
    """LeRobotDataset v3.0 folder (v2.1 / v2.0: read through its v3.0 conversion); default: the run's --dataset.root."""
    episodes: tuple[int, ...] | None = None
    """Episodes for the offline metrics; default: the ones the run held out."""
    batch_size: int = 32
    max_frames: int | None = None
    """Evaluate at most this many frames (evenly spread) offline; None: all."""
    rollout_episodes: int = 50
    """Closed-loop episodes in the simulated reach task; 0 skips them."""
    rollout_colors: tuple[str, ...] | None = None
    """Target colors of the rollouts; default: the colors of the dataset's tasks."""
    compare_base: bool = False
    """Also roll out the base policy with the run's config and stats (its step 0: success before fine-tuning)."""
    n_action_steps: int | None = None
    """Actions executed per predicted chunk; default: the policy config's n_action_steps."""
    max_steps: int = 40
    num_steps: int | None = None
    """Denoising steps; default: the policy's."""
    seed: int = 0
    gif_episodes: int = 4
    output_dir: str | None = None
    """Where eval results go; default: <run folder>/eval."""
    device: str | None = None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def closed_loop(predictors: dict[str, Predictor], settings: RolloutSettings, out_dir: Path,
                run_dir: Path | None, checkpoint: str | Path) -> dict[str, Any]:
    """Roll out each predictor ("before", "after") on the same seeded episodes; write JSON, GIFs and the plot."""
    results = {}
    for name, predictor in predictors.items():
        result = rollout(predictor, settings)
        save_gif(result, out_dir / f"rollout_{name}.gif")
        results[name] = public(result)
    summary = {**results, "checkpoint": str(checkpoint), "colors": list(settings.colors), "seed": settings.seed,
               "max_steps": settings.max_steps}
    write_json(out_dir / Path(CLOSED_LOOP_FILE).name, summary)
    if run_dir is not None:
        plot_metrics(run_dir, out_dir / "metrics.png", results)
    return summary


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    checkpoint = Path(cfg.checkpoint).resolve()
    run_dir = run_dir_of(checkpoint)
    if cfg.output_dir:
        out_dir = Path(cfg.output_dir)
    else:  # the run folder's eval/, or beside a folder that is not in a run
        out_dir = run_dir / "eval" if run_dir is not None else checkpoint.with_name(checkpoint.name + "_eval")
    train_cfg = read_train_config(checkpoint)
    dataset_root = cfg.dataset_root or (train_cfg.dataset.roots[0] if train_cfg and train_cfg.dataset.roots else None)
    if dataset_root is None:
        raise ValueError("no dataset: pass --dataset-root (the checkpoint's train_config.json names none)")
    predictor = Predictor.from_checkpoint(checkpoint, cfg.base, device=cfg.device, num_steps=cfg.num_steps)
    dataset_root = ensure_v30(dataset_root)  # a v2.x dataset: its v3.0 conversion, as training read it
    meta = load_dataset_meta(dataset_root)
    episodes = list(cfg.episodes) if cfg.episodes is not None else heldout_episodes(checkpoint, meta.total_episodes)
    tolerance_s = train_cfg.dataset.tolerance_s if train_cfg else DEFAULT_TOLERANCE_S  # what the run trained with
    results: dict[str, Any] = {"offline": offline_metrics(predictor, dataset_root, episodes, cfg.batch_size,
                                                          cfg.max_frames, cfg.seed, tolerance_s)}
    write_json(out_dir / Path(OFFLINE_METRICS_FILE).name, results["offline"])
    off = results["offline"]
    print(f"offline, {off['frames']} frames of episodes {off['episodes']}: action MSE {off['action_mse']:.6f} "
          f"(per dim {np.round(off['action_mse_per_dim'], 6).tolist()}), L1 {off['action_l1']:.5f}, "
          f"normalized MSE {off['action_mse_normalized']:.4f}")
    settings = None
    if cfg.rollout_episodes > 0:
        try:
            settings = settings_from_dataset(dataset_root, cfg.rollout_colors, episodes=cfg.rollout_episodes,
                                             seed=cfg.seed, n_action_steps=cfg.n_action_steps,
                                             max_steps=cfg.max_steps, record=cfg.gif_episodes)
        except ValueError as err:  # a real robot's dataset: there is no simulator for it
            print(f"eval: no closed-loop rollouts: {err}", file=sys.stderr)
    if settings is not None:
        predictors = {}
        if cfg.compare_base:
            predictors["before"] = Predictor.from_checkpoint(checkpoint, cfg.base, device=cfg.device,
                                                             num_steps=cfg.num_steps, use_trained_weights=False)
        predictors["after"] = predictor
        results["closed_loop"] = closed_loop(predictors, settings, out_dir, run_dir, checkpoint)
        print(success_line(results["closed_loop"]))
    elif run_dir is not None:
        plot_metrics(run_dir, out_dir / "metrics.png")
    print(f"eval results in {out_dir}")
    return results


def success_line(result: dict[str, Any]) -> str:
    parts = [f"{name} {100 * result[name]['success_rate']:.0f}%" for name in ("before", "after") if name in result]
    any_result = result.get("after") or result.get("before")
    return (f"closed-loop success over {any_result['episodes']} seeded episodes ({', '.join(result['colors'])}): "
            + " -> ".join(parts))


# --- closed loop in a simulator (Meta-World, LIBERO) for any policy --------------------------------------------------

SIM_RESULTS_FILE = "sim_eval.json"


@dataclass(frozen=True)
class SimEvalConfig:
    checkpoint: str
    """Adapter checkpoint, merged folder, or any LeRobot-format policy folder with normalization stats."""
    env: str = "metaworld"
    """Simulator: metaworld or libero (reach: the synthetic task, evaluated by the dataset-based command)."""
    tasks: str = ""
    """Meta-World tasks, comma-separated, or a set (MT10, ML10_train, ML10_test, MT50)."""
    suite: str | None = None
    """LIBERO suite (libero_spatial, libero_object, libero_goal, libero_10, libero_90), or <suite>:<task index>."""
    episodes: int = 50
    """Seeded episodes per task (episode i resets with seed + i)."""
    seed: int = 0
    base: str | None = None
    """Base policy for an adapter checkpoint; default: the one in its train_config.json."""
    n_action_steps: int | None = None
    """Actions executed per predicted chunk before predicting again; default: the policy config's."""
    max_steps: int | None = None
    """Episode step limit; default: the env's (Meta-World 200, LIBERO per suite)."""
    image_size: int | None = None
    """Rendered camera size; default: the policy's input image size."""
    cameras: tuple[str, ...] | None = None
    """Meta-World cameras to render; default: the ones the policy's observation.images.<camera> keys name."""
    state: str | None = None
    """Meta-World observation.state kind (agent 4, objects 21, full 39 values); default: the policy's state size's."""
    assets_dir: str | None = None
    """LIBERO's scene assets folder (tools/libero_assets.py makes one); default: LIBERO's config.yaml entry, else
    hf-libero's own folder."""
    num_envs: int = 10
    """Envs stepped in lockstep, with one batched policy call for all that need a new chunk."""
    video_episodes: int = 1
    """Episodes per task recorded to videos/<task>.mp4."""
    num_steps: int | None = None
    """Denoising steps; default: the policy's."""
    tokenizer_path: str | None = None
    output_dir: str | None = None
    """Where results go; default: <run folder>/eval_<env>, or beside the policy folder."""
    device: str | None = None


def sim_env_kwargs(cfg: SimEvalConfig, predictor: Predictor) -> tuple[dict[str, Any], int]:
    """Env options that match the policy (cameras, state kind, image size) unless the flags say otherwise."""
    inverse = {v: k for k, v in predictor.processor.rename_map.items()}
    keys = [inverse.get(c, c) for c in predictor.cameras]
    shape = predictor.config.input_features[predictor.cameras[0]]["shape"] if predictor.cameras else [3, 128, 128]
    image_size = cfg.image_size or int(shape[-1])
    limit = {"max_steps": cfg.max_steps} if cfg.max_steps else {}
    if cfg.env != "metaworld":
        return limit, image_size
    from finetune.envs.metaworld import CAMERAS, DEFAULT_CAMERAS, STATE_KINDS

    named = [k.removeprefix("observation.images.") for k in keys]
    cameras = cfg.cameras or tuple(c for c in named if c in CAMERAS) or DEFAULT_CAMERAS
    by_size = {n: kind for kind, n in STATE_KINDS.items()}
    state = cfg.state or by_size.get(predictor.config.state_dim, "agent")
    return {"cameras": cameras, "state": state, **limit}, image_size


def check_policy_on_env(predictor: Predictor, env_type: str, task: str, image_size: int, env_kwargs: dict) -> None:
    """Build one env and compare its cameras, state and action sizes with the policy's (one-line error if not)."""
    from finetune.envs import make_env
    from finetune.envs.rollout import check_policy_fits_env

    inverse = {v: k for k, v in predictor.processor.rename_map.items()}
    env = make_env(env_type, task, image_size=image_size, **env_kwargs)
    try:
        check_policy_fits_env(env, [inverse.get(c, c) for c in predictor.cameras], predictor.config.state_dim,
                              predictor.action_dim)
    finally:
        env.close()


def save_video(frames: list[np.ndarray], path: Path, fps: int = 30) -> Path | None:
    """The recorded episodes one after another as an mp4 (H.264 where this PyAV build has it)."""
    from finetune.data.video import encode_video

    if not frames:
        return None
    encode_video(np.concatenate(frames), path, fps, codec="libx264")
    return path


def plot_success(result: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["per_task"])
    rates = [100 * result["per_task"][t]["success_rate"] for t in tasks]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(tasks) + 1.5), 3.6))
    bars = ax.bar(range(len(tasks)), rates, color="#2a7ab9")
    ax.bar_label(bars, fmt="%.0f%%")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("success (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def success_table(result: dict[str, Any]) -> str:
    width = max(len(t) for t in result["per_task"]) + 2
    lines = [f"{'task':<{width}}{'success':>8}{'episodes':>10}{'mean steps':>12}"]
    for task, r in result["per_task"].items():
        lines.append(f"{task:<{width}}{100 * r['success_rate']:>7.0f}%{r['episodes']:>10}{r['mean_steps']:>12.1f}")
    lines.append(f"{'mean':<{width}}{100 * result['success_rate']:>7.0f}%")
    return "\n".join(lines)


def evaluate_in_sim(cfg: SimEvalConfig) -> dict[str, Any]:
    """Seeded closed-loop episodes per task; writes sim_eval.json, success.png and videos/<task>.mp4."""
    from finetune.envs import check_env, default_tasks
    from finetune.envs.rollout import run_closed_loop

    spec = cfg.suite if cfg.env == "libero" else cfg.tasks
    if cfg.env == "metaworld" and not cfg.tasks:
        raise ValueError("--tasks is empty: name Meta-World tasks (push-v3,reach-v3) or a set (MT10, ML10_test)")
    if cfg.env == "libero" and not cfg.suite:
        raise ValueError("--suite is empty: name a LIBERO suite (libero_spatial, libero_object, libero_goal, "
                         "libero_10) or <suite>:<task index>")
    if cfg.episodes < 1:
        raise ValueError(f"--episodes must be at least 1, got {cfg.episodes}")
    check_env(cfg.env, assets_dir=cfg.assets_dir)  # unknown env, missing extra or assets: before loading a policy
    tasks = default_tasks(cfg.env, spec)
    predictor = Predictor.from_checkpoint(cfg.checkpoint, cfg.base, device=cfg.device, num_steps=cfg.num_steps,
                                          tokenizer_path=cfg.tokenizer_path)
    env_kwargs, image_size = sim_env_kwargs(cfg, predictor)
    check_policy_on_env(predictor, cfg.env, tasks[0], image_size, env_kwargs)
    k = cfg.n_action_steps or getattr(predictor.config, "n_action_steps", None) or predictor.chunk_size
    k = max(1, min(k, predictor.chunk_size))
    folder = Path(cfg.checkpoint).resolve()
    run_dir = run_dir_of(folder)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else (
        run_dir / f"eval_{cfg.env}" if run_dir is not None else folder.with_name(f"{folder.name}_eval_{cfg.env}"))
    from tqdm.auto import tqdm

    with tqdm(total=cfg.episodes * len(tasks), desc=f"{cfg.env} episodes", unit="episode", file=sys.stderr) as bar:
        result = run_closed_loop(predictor_policy(predictor, cfg.seed), cfg.env, tasks, cfg.episodes, seed=cfg.seed,
                                 n_action_steps=k, image_size=image_size, max_steps=None,
                                 record_video_episodes=cfg.video_episodes, batched=True, num_envs=cfg.num_envs,
                                 env_kwargs=env_kwargs, progress=bar.update)
    frames = result.pop("frames")
    videos = {}
    for task, episodes in frames.items():
        path = save_video(episodes, out_dir / "videos" / f"{task.replace(':', '_')}.mp4")
        if path is not None:
            videos[task] = str(path.relative_to(out_dir))
    summary = {**result, "env": cfg.env, "tasks": tasks, "checkpoint": str(cfg.checkpoint), "seed": cfg.seed,
               "n_action_steps": k, "image_size": image_size, "env_options": env_kwargs, "videos": videos}
    write_json(out_dir / SIM_RESULTS_FILE, summary)
    plot_success(result, out_dir / "success.png", f"{cfg.env}: {Path(cfg.checkpoint).name}, {cfg.episodes} seeded "
                                                   "episodes per task")
    print(success_table(result))
    print(f"eval results in {out_dir}")
    return summary


DATASET_MODE, SIM_MODE = "dataset", "sim"
Mode = (Annotated[EvalConfig, tyro.conf.subcommand(
            DATASET_MODE, description="Held-out episodes of a dataset: offline action errors per dimension and "
            "chunk position, and closed-loop rollouts of the synthetic reach task (GIFs, metrics plot).")]
        | Annotated[SimEvalConfig, tyro.conf.subcommand(
            SIM_MODE, description="Closed loop in a simulator (--env metaworld or libero): success rate per task "
            "over seeded episodes, videos, a plot. Needs the '.[sim]' or '.[libero]' extra.")])


def _env_flag(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--env="):
            return arg.split("=", 1)[1]
        if arg == "--env" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def with_mode(argv: list[str]) -> list[str]:
    """`finetune-eval dataset|sim [flags]`; without the word, `--env metaworld|libero` means sim, anything else
    (or `--env reach`) dataset; `--help` alone lists both modes."""
    if argv and argv[0] in (DATASET_MODE, SIM_MODE):
        return argv
    if all(arg in ("-h", "--help") for arg in argv):
        return argv or ["--help"]
    env = _env_flag(argv)
    if env is not None and env != "reach":
        return [SIM_MODE, *argv]
    if env == "reach":
        i = argv.index("--env") if "--env" in argv else argv.index("--env=reach")
        argv = argv[:i] + argv[i + (2 if argv[i] == "--env" else 1):]
    return [DATASET_MODE, *argv]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Two modes, as subcommands: `dataset` (offline metrics and reach rollouts) and `sim` (Meta-World, LIBERO)."""
    from finetune.envs import EnvUnavailable

    argv = with_mode(list(sys.argv[1:] if argv is None else argv))
    with exit_on(ValueError, FileNotFoundError, EnvUnavailable):
        cfg = tyro.cli(Mode, args=argv, prog="finetune-eval",
                       description="Evaluate a trained policy: `finetune-eval dataset --help` or `finetune-eval sim "
                       "--help` for each mode's flags.")
        return evaluate_in_sim(cfg) if isinstance(cfg, SimEvalConfig) else evaluate(cfg)


cli = console_script(main)


if __name__ == "__main__":
    main()
