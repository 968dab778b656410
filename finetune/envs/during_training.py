"""Closed-loop evaluation of the policy being trained (`--env.type`, LeRobot's `--env.*`): the one hook through which
training reaches the simulators. finetune.train imports this module only when --env.type is given."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.adapters import base_policy
from finetune.config import ConfigError, TrainConfig
from finetune.envs import check_env, default_tasks, make_env, rollout
from finetune.policies.base import OBS_STATE, TASK
from finetune.policies.processor import PolicyProcessor

log = logging.getLogger(__name__)


class SimEvaluation:
    """Success rate in the simulator at the end of training and every --env.eval-every updates, on the main process.

    Built before any model is: an unknown env or task, a missing simulator extra or missing assets, or a sharded
    (ZeRO-3) model stop the run up front rather than after hours of training.
    """

    def __init__(self, cfg: TrainConfig, sharded: bool):
        env = cfg.env
        if not env.task:
            raise ConfigError(f"--env.type {env.type} needs --env.task (e.g. libero_spatial, push-v3, MT10)")
        if env.episodes < 1 or env.eval_every < 0:
            raise ConfigError("--env.episodes must be >= 1 and --env.eval-every >= 0 (0: only at the end)")
        if sharded:
            raise ConfigError("--env.type: simulator evaluation runs the policy on one process, which ZeRO-3's "
                              "sharded weights do not allow; use a ZeRO-1/2 or DDP config, or evaluate the checkpoint "
                              "afterwards")
        try:
            check_env(env.type, assets_dir=env.assets_dir)  # the assets folder first: LIBERO's task list needs it
            check_env(env.type, default_tasks(env.type, env.task))
        except (ValueError, RuntimeError) as err:  # unknown env/task; EnvUnavailable: extra or assets missing
            raise ConfigError(f"--env.type {env.type} --env.task {env.task}: {err}") from None
        self.cfg = cfg
        self.fits_checked = False

    def due(self, step: int) -> bool:
        every = self.cfg.env.eval_every
        return step == self.cfg.steps or (every > 0 and step % every == 0)

    def image_size(self, policy: nn.Module) -> int:
        pcfg = base_policy(policy).config
        cameras = [pcfg.input_features[k]["shape"] for k in pcfg.image_features]
        return self.cfg.env.image_size or (cameras[0][1] if cameras else 128)  # as the dataset's camera

    def check_policy_fits(self, policy: nn.Module) -> None:
        """The simulator gives the policy's cameras (after --dataset.rename-map), state size and action size."""
        cfg, pcfg = self.cfg, base_policy(policy).config
        env_names = {v: k for k, v in cfg.dataset.rename_map.items()}  # policy name -> the env's (dataset's) name
        env = make_env(cfg.env.type, default_tasks(cfg.env.type, cfg.env.task)[0], image_size=self.image_size(policy))
        try:
            rollout.check_policy_fits_env(env, [env_names.get(k, k) for k in pcfg.image_features], pcfg.state_dim,
                                          pcfg.action_dim)
        except ValueError as err:
            raise ConfigError(f"--env.type {cfg.env.type} --env.task {cfg.env.task}: {err}") from None
        finally:
            env.close()

    def run(self, step: int, policy: nn.Module, processor: PolicyProcessor, device: torch.device,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
        """Call on the main process after each update with the trained (unwrapped) model; returns the metrics to log
        when an evaluation was due, else {}. The first call checks that the policy fits the simulator."""
        if not self.fits_checked:
            self.check_policy_fits(policy)  # after the first update, not after hours
            self.fits_checked = True
        if not self.due(step):
            return {}
        cfg = self.cfg
        was_training = policy.training
        policy.eval()
        with torch.no_grad():
            act = make_action_chunk_fn(policy, processor, cfg.dataset.rename_map, device, autocast, seed=cfg.seed)
            result = rollout.run_closed_loop(act, cfg.env.type, default_tasks(cfg.env.type, cfg.env.task),
                                             cfg.env.episodes, seed=cfg.seed,
                                             n_action_steps=base_policy(policy).config.n_action_steps,
                                             image_size=self.image_size(policy), max_steps=cfg.env.max_steps,
                                             batched=True)
        policy.train(was_training)
        per_task = result["per_task"]
        episodes = sum(r["episodes"] for r in per_task.values())
        log.info(f"step {step}: {cfg.env.type} {cfg.env.task} success rate {result['success_rate']:.1%} "
                 f"({episodes} episodes)")
        return {"sim/success_rate": result["success_rate"],
                **{f"sim/{task}/success_rate": r["success_rate"] for task, r in per_task.items()}}


def make_action_chunk_fn(policy: nn.Module, processor: PolicyProcessor, rename: dict[str, str], device: torch.device,
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                         seed: int = 0):
    """A policy as a batched finetune.envs ActionChunkFn: (env observations, instructions) -> (B, chunk, action_dim)
    actions in robot units (normalization undone), with seeded sampling noise. `policy` may be an adapter wrapper."""
    pcfg = base_policy(policy).config
    generator = torch.Generator().manual_seed(seed)

    def act(observations: list[dict[str, np.ndarray]], instructions: list[str]) -> np.ndarray:
        obs = [{rename.get(k, k): v for k, v in o.items()} for o in observations]
        if OBS_STATE not in obs[0]:
            raise ConfigError(f"the simulator's observation has no {OBS_STATE!r} ({sorted(observations[0])}); map its "
                              "keys with --dataset.rename-map")
        batch: dict[str, Any] = {  # (B, H, W, 3) uint8 -> (B, 3, H, W) in [0, 1], as the dataset's frames
            k: torch.as_tensor(np.stack([o[k] for o in obs])).permute(0, 3, 1, 2).float() / 255
            for k in pcfg.image_features if k in obs[0]}
        batch[OBS_STATE] = torch.as_tensor(np.stack([np.asarray(o[OBS_STATE], np.float32).reshape(-1) for o in obs]))
        batch[TASK] = list(instructions)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in processor.prepare(batch).items()}
        noise = torch.randn(len(obs), pcfg.chunk_size, pcfg.max_action_dim, generator=generator).to(device)
        with autocast():
            chunk = policy.predict_action_chunk(batch, noise=noise)
        return processor.unnormalize_actions(chunk.float().cpu()).numpy()

    return act
