"""Fine-tune a VLA policy with PEFT adapters: `accelerate launch finetune/train.py <preset> [--flags]`.

setup() builds everything from the config (policy, adapter, data, optimizer) and restores a checkpoint on --resume;
fit() runs the loop: accumulate -> autocast -> backward -> clip and step only when gradients sync.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `finetune` importable and keep finetune/ off the path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune import _quiet  # noqa: F401 - first: silences notices raised while peft imports bitsandbytes
from finetune import checkpoint as ckpt
from finetune import distributed as dist
from finetune.adapters import base_policy, count_parameters, quantize_and_attach, set_full_training_grads
from finetune.checkpoint import CheckpointWriteError
from finetune.config import (
    RESUME_AUTO,
    ConfigError,
    TrainConfig,
    cli,
    flat_fields,
    from_dict,
    to_dict,
    trajectory_changes,
    validate,
)
from finetune.data import DatasetError, LeRobotDataset, loading
from finetune.data.multi import DataMix, MixtureDataset, WeightedMixtureSampler
from finetune.data.stats import aggregate_stats, check_stats, needed_stats
from finetune.data.transforms import ImageTransforms
from finetune.ema import EMA
from finetune.hub import load_tokenizer, resolve_repo
from finetune.metrics import MetricsLogger, check_trackers, read_metrics
from finetune.policies import POLICIES, load_policy, load_policy_config, save_policy
from finetune.policies.base import ACTION, ACTION_IS_PAD, OBS_STATE, TASK
from finetune.policies.common import DTYPES
from finetune.policies.cpu_linear import use_cpu_linear
from finetune.preemption import STOP, Preempted, StopRequest, report_preempted, write_status
from finetune.processor import PolicyProcessor, image_keys, images_to_float, save_stats
from finetune.publish import check_push_access, push_repo_ids, push_run
from finetune.relative_actions import action_names, config_mask, relative_action_stats, uses_relative_actions
from finetune.relative_actions import configure as configure_relative_actions
from finetune.sampling import ResumableBatchSampler


def get_lr_factor(step: int, warmup_steps: int, decay_steps: int, peak_lr: float, decay_lr: float) -> float:
    """LeRobot's cosine-decay-with-warmup schedule as a multiplier of the peak lr, for optimizer update `step`."""
    if step < warmup_steps:
        if step <= 0:
            return 1 / (warmup_steps + 1)
        frac = 1 - step / warmup_steps
        return (1 / (warmup_steps + 1) - 1) * frac + 1
    progress = min(step, decay_steps) / max(1, decay_steps)
    alpha = decay_lr / peak_lr
    return (1 - alpha) * 0.5 * (1 + math.cos(math.pi * progress)) + alpha


@dataclass
class Run:
    cfg: TrainConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    processor: PolicyProcessor
    train_loader: DataLoader
    sampler: ResumableBatchSampler
    eval_batches: list[EvalBatch]
    policy_dir: Path
    step: int = 0
    samples_seen: int = 0
    micro_batches: int = 0  # global micro-batches trained on (seeds each one's flow-matching noise)
    resumed_step: int | None = None  # the checkpoint's step when resuming
    skipped_updates: int = 0  # updates skipped for a non-finite loss/gradient (--nonfinite skip)
    ema: EMA | None = None  # moving average of the trained weights (--ema.decay)
    eval_sources: list[str] = field(default_factory=list)  # with several datasets: each eval batch's dataset
    eval_by_dataset: dict[str, float] = field(default_factory=dict)  # the last evaluation per dataset, to log
    summary: dict[str, Any] = field(default_factory=dict)
    image_transforms: ImageTransforms | None = None  # training-image augmentation, None when off


def _mixed_precision(cfg: TrainConfig) -> str | None:
    """--mixed-precision, else autocast in the dtype of a half-precision base (its frozen layers would otherwise meet
    fp32 inputs), else whatever the accelerate config says."""
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision
    return {"bfloat16": "bf16", "float16": "fp16"}.get(cfg.policy.dtype)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    kwargs: dict[str, Any] = {"timeout": dist.process_group_timeout()}  # a stuck collective fails, never hangs
    cpu_ranks = not torch.cuda.is_available() and dist.launched_world_size() > 1
    if cpu_ranks:
        kwargs["backend"] = "gloo"  # CPU ranks: without it DeepSpeed ranks silently run alone
    mixed_precision = _mixed_precision(cfg)
    # Another run earlier in this process (a notebook, the tests) may have used another precision: Accelerate keeps
    # one process-wide state and refuses the change, so that part starts over (the process group is kept).
    wanted = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # None: the launch config's
    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != wanted and not dist.wants_deepspeed():  # DeepSpeed records "no" and casts itself
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum_steps,
        mixed_precision=mixed_precision,
        cpu=cpu_ranks and not dist.wants_deepspeed(),  # CPU DDP (MULTI_CPU); cpu=True would switch DeepSpeed off
        kwargs_handlers=[InitProcessGroupKwargs(**kwargs)],
    )
    ckpt.exclude_model_weights_from_state(accelerator)
    dist.build_models_whole(accelerator)
    return accelerator


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def device_batch(run: Run, batch: dict[str, Any]) -> dict[str, Any]:
    """A loader batch on the training device: uint8 images become float there, then are augmented when enabled
    (seeded by the global micro-batch index, like the flow-matching noise, so --resume stays exact)."""
    batch = images_to_float(to_device(batch, run.accelerator.device))
    if run.image_transforms is not None:
        run.image_transforms(batch, image_keys(batch), run.micro_batches, run.accelerator.process_index,
                             run.accelerator.num_processes)
    return batch


def policy_features(meta, rename_map: dict[str, str]) -> tuple[dict, dict]:
    """The policy's input/output features from the dataset's (cameras, state, action), after renaming."""
    inputs = {}
    for key in meta.camera_keys:
        h, w, c = meta.features[key]["shape"]
        inputs[rename_map.get(key, key)] = {"type": "VISUAL", "shape": [c, h, w]}
    for key, kind in ((OBS_STATE, "STATE"),):
        if key not in meta.features:
            raise DatasetError(f"{meta.root / 'meta/info.json'}: features has no {key!r}; the policy needs a state")
        inputs[rename_map.get(key, key)] = {"type": kind, "shape": list(meta.features[key]["shape"])}
    if ACTION not in meta.features:
        raise DatasetError(f"{meta.root / 'meta/info.json'}: features has no 'action'")
    return inputs, {ACTION: {"type": "ACTION", "shape": list(meta.features[ACTION]["shape"])}}


def main_print(accelerator: Accelerator, *args: Any) -> None:
    """Print on the global main process only (accelerator.print prints once per node)."""
    if accelerator.is_main_process:
        print(*args, flush=True)


def check_policy_folder(cfg: TrainConfig, policy_dir: Path, batch_size: int) -> None:
    """A readable config.json of a known policy type, complete weights, and a chunk size that fits in memory."""
    config_path, weights = policy_dir / "config.json", policy_dir / "model.safetensors"
    try:
        data = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{config_path} not found: --policy.path must be a LeRobot-format policy folder "
                          "(config.json + model.safetensors)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_path} is not valid JSON ({err}); copy the policy folder again") from None
    if data.get("type") not in POLICIES:
        raise ConfigError(f"{config_path}: field 'type' is {data.get('type')!r}, not a policy this suite trains "
                          f"({', '.join(sorted(POLICIES))}); point --policy.path at a SmolVLA, pi0 or pi0.5 folder")
    check_safetensors(weights, "copy or download the policy folder again")
    chunk = cfg.policy.chunk_size or int(data.get("chunk_size", 50))
    check_chunk_size_fits(chunk, int(data.get("tokenizer_max_length", 48)), batch_size)


def check_safetensors(path: Path, fix: str) -> None:
    """Refuse a missing or truncated .safetensors file (its header declares more bytes than the file holds)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ConfigError(f"{path} not found; {fix}")
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path} is truncated or corrupt ({err}); {fix}") from None


def check_chunk_size_fits(chunk: int, text_tokens: int, batch_size: int) -> None:
    """Refuse an action chunk whose attention scores alone cannot fit, before anything is allocated. A lower bound:
    one micro-batch x one head x (chunk + instruction tokens)^2 float32 scores."""
    import psutil

    tokens = chunk + text_tokens
    need = batch_size * tokens * tokens * 4
    if torch.cuda.is_available():
        have, where = torch.cuda.mem_get_info()[1], "GPU memory"
    else:
        have, where = psutil.virtual_memory().total, "RAM"
    if need > have:
        raise ConfigError(f"--policy.chunk-size {chunk} needs at least {need / 2**30:.1f} GiB for one micro-batch's "
                          f"attention scores ({batch_size} x {tokens}^2 tokens x 4 bytes), more than the "
                          f"{have / 2**30:.1f} GiB of {where}; use the policy's chunk size (50 for SmolVLA/pi0) or "
                          "a smaller --batch-size")


def load_base_policy(cfg: TrainConfig, policy_dir: Path, meta) -> nn.Module:
    overrides = {k: v for k, v in (("chunk_size", cfg.policy.chunk_size), ("num_steps", cfg.policy.num_steps))
                 if v is not None}
    try:
        policy = load_policy(policy_dir, dtype=DTYPES[cfg.policy.dtype], **overrides)
    except ValueError as err:  # weights that do not match config.json: the loader names file and keys
        raise ConfigError(f"{err}; copy the policy folder again or fix its config.json") from None
    inputs, outputs = policy_features(meta, cfg.dataset.rename_map)
    pcfg = policy.config
    if inputs[OBS_STATE]["shape"][0] > getattr(pcfg, "max_state_dim", 1 << 30):
        raise ConfigError(f"the dataset's state has {inputs[OBS_STATE]['shape'][0]} dims, more than the policy's "
                          f"max_state_dim {pcfg.max_state_dim}")
    if outputs[ACTION]["shape"][0] > getattr(pcfg, "max_action_dim", 1 << 30):
        raise ConfigError(f"the dataset's action has {outputs[ACTION]['shape'][0]} dims, more than the policy's "
                          f"max_action_dim {pcfg.max_action_dim}")
    pcfg.input_features, pcfg.output_features = inputs, outputs  # as LeRobot: features come from the dataset
    use_relative = cfg.policy.use_relative_actions or None  # off: the checkpoint's own setting
    error = configure_relative_actions(pcfg, use_relative, cfg.policy.relative_exclude_joints,
                                       action_names(meta.features[ACTION]))
    if error:
        raise ConfigError(error)
    policy.set_gradient_checkpointing(cfg.policy.gradient_checkpointing)
    policy.set_attn_implementation(cfg.policy.attn_implementation)
    return policy


def split_episodes(total: int, eval_episodes: int) -> tuple[list[int], list[int]]:
    if eval_episodes >= total:
        raise ConfigError(f"--dataset.eval-episodes {eval_episodes} leaves no training episode (dataset has {total})")
    return list(range(total - eval_episodes)), list(range(total - eval_episodes, total))


@dataclass
class EvalBatch:
    """This rank's rows of one fixed held-out batch: `size` rows in the global batch, `rows` of them held here
    (images as uint8), weighted by `weight` (0 for a rank left without rows: it still runs the forward pass)."""

    size: int
    rows: list[int]
    weight: float
    batch: dict[str, Any]


def fixed_eval_batches(dataset: LeRobotDataset, processor: PolicyProcessor, batch_size: int, count: int,
                       accelerator: Accelerator | None = None) -> list[EvalBatch]:
    """A fixed, evenly spread subset of held-out frames, so every evaluation sees the same inputs; each rank reads
    and keeps only its own rows of each global batch."""
    n = min(len(dataset), batch_size * count)
    indices = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()
    out = []
    for s in range(0, n, batch_size):
        chunk = indices[s : s + batch_size]
        if accelerator is None:
            rows, weight = list(range(len(chunk))), 1.0
        else:
            rows, weight = dist.eval_rows(len(chunk), accelerator)
        out.append(EvalBatch(len(chunk), rows, weight, processor([dataset[chunk[r]] for r in rows])))
    return out


def setup(cfg: TrainConfig, accelerator: Accelerator) -> Run:
    set_seed(cfg.seed)
    policy_dir = resolve_repo(cfg.policy.path, "model", "--policy.path")
    check_policy_folder(cfg, policy_dir, cfg.batch_size)  # a readable, known policy before anything reads it
    # One dataset or several (--dataset.root A B): checked to line up, stats merged across them.
    mix = DataMix.load(cfg.dataset, lambda hub_id: resolve_repo(hub_id, "dataset", "--dataset.root"))
    if len(mix) > 1:  # the train config records every dataset and its resolved weight
        cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, weights=tuple(mix.weights)))
    meta = mix.merged_meta()
    # Missing stats: stop now, before any model is built, and say which command adds them.
    needed = needed_stats(load_policy_config(policy_dir).normalization_mapping)
    if cfg.policy.use_relative_actions or uses_relative_actions(load_policy_config(policy_dir)):
        needed.pop(ACTION)  # computed below on the relative actions
    for source in mix.sources:
        check_stats({cfg.dataset.rename_map.get(k, k): v for k, v in source.view.stats.items()}, needed, source.root)
    policy = load_base_policy(cfg, policy_dir, meta)
    tokenizer = load_tokenizer(policy_dir, cfg.policy.tokenizer_path, policy.config.tokenizer_name)
    stats = {cfg.dataset.rename_map.get(k, k): v for k, v in meta.stats.items()}
    if uses_relative_actions(policy.config):  # normalize what the policy learns: the relative actions
        stats[ACTION] = aggregate_stats([{ACTION: relative_action_stats(
            s.root, policy.config.chunk_size, config_mask(policy.config), s.source_key(OBS_STATE),
            s.source_key(ACTION))} for s in mix.sources])[ACTION]
    processor = PolicyProcessor(policy.config, tokenizer, stats, cfg.dataset.rename_map)

    resume_from = ckpt.resolve_last(cfg.checkpoints_dir) if cfg.resume else None
    if resume_from is not None and not (resume_from / "adapter_config.json").is_file():
        check_checkpoint_files(resume_from, ["config.json"], ["model.safetensors"])
        model = load_policy(resume_from)  # a FULL run: its checkpoint holds the whole policy
        model.config.input_features, model.config.output_features = policy.config.input_features, \
            policy.config.output_features
        model.set_attn_implementation(cfg.policy.attn_implementation)
        set_full_training_grads(model)
    else:  # resuming: the saved adapter itself, not a fresh one on top
        if resume_from is not None:
            check_checkpoint_files(resume_from, ["adapter_config.json"], ["adapter_model.safetensors"])
        model = quantize_and_attach(policy, cfg.quant, cfg.peft, accelerator.device, adapter_dir=resume_from,
                                    trainable=True)
    for p in model.parameters():  # trained parameters in float32 whatever the base's storage dtype
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    # ZeRO-3 gathers and frees weights around each module and handles torch's linear only
    use_cpu_linear(model, "aten" if dist.zero_stage(accelerator) == 3 else cfg.policy.cpu_linear)

    splits = mix.splits(cfg.dataset.episodes, cfg.dataset.eval_episodes)
    chunk = policy.config.chunk_size
    cache = cfg.dataset.video_cache_mb << 20
    local_ranks = loading.local_world_size(accelerator.num_processes)
    workers = loading.resolve_num_workers(cfg.dataset.num_workers, local_ranks)
    threads = cfg.dataset.decoder_threads or loading.default_decoder_threads(loading.available_cpus(), local_ranks,
                                                                             workers)
    data_kwargs = dict(video_cache_bytes=cache, uint8_images=True, decoder_threads=threads)
    members = [LeRobotDataset(s.root, chunk, episodes=train, keys=s.keys, **data_kwargs)
               for s, (train, _) in zip(mix.sources, splits)]
    if len(mix) == 1:
        train_set = MixtureDataset(members, [mix.sources[0].rename]) if mix.sources[0].rename else members[0]
        sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, accelerator.num_processes,
                                        accelerator.process_index, cfg.seed)
    else:  # each dataset under the common names, drawn with its weight
        train_set = MixtureDataset(members, [s.rename for s in mix.sources])
        sampler = WeightedMixtureSampler(train_set.lengths, mix.weights, cfg.batch_size, accelerator.num_processes,
                                         accelerator.process_index, cfg.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=processor,
                        generator=torch.Generator().manual_seed(0),
                        **loading.loader_kwargs(workers, accelerator.device, cfg.dataset.prefetch_factor))
    eval_batches, eval_sources = [], []
    for source, (_, eval_eps) in zip(mix.sources, splits):  # held-out episodes per dataset
        if not eval_eps:
            continue
        # on every rank: each evaluates its own rows (and under ZeRO-3 all must run the forward passes)
        eval_set = MixtureDataset([LeRobotDataset(source.root, chunk, episodes=eval_eps, keys=source.keys,
                                                  **data_kwargs)], [source.rename])
        # global-batch-sized, so the figure is the same whatever the number of processes
        held = fixed_eval_batches(eval_set, processor, cfg.batch_size * accelerator.num_processes, cfg.eval_batches,
                                  accelerator)
        eval_batches += held
        eval_sources += [source.name] * len(held) if len(mix) > 1 else []

    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    # foreach: batched updates over all tensors; torch picks it by default on CUDA only, CPU runs a per-tensor loop
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  foreach=True)
    decay_steps = o.decay_steps or cfg.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: get_lr_factor(s, o.warmup_steps, decay_steps, o.lr, o.decay_lr))
    trainable, total = count_parameters(model)  # before prepare: ZeRO-3 leaves each rank a shard
    dist.fill_deepspeed_config(cfg, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per update, saved with the state

    run = Run(cfg, accelerator, model, optimizer, scheduler, processor, loader, sampler, eval_batches, policy_dir)
    run.ema = make_ema(cfg, accelerator, model)
    run.eval_sources = eval_sources
    if cfg.dataset.image_transforms.enable:
        try:
            run.image_transforms = ImageTransforms(cfg.dataset.image_transforms, cfg.seed)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from / ckpt.TRAINING_STATE_DIR), **dist.load_state_kwargs(accelerator))
        except (OSError, RuntimeError, EOFError, ValueError, KeyError) as err:
            raise ConfigError(f"{resume_from / ckpt.TRAINING_STATE_DIR}: the optimizer/scheduler state cannot be "
                              f"loaded ({type(err).__name__}: {str(err)[:200]}); {_earlier_checkpoint_fix(resume_from)}"
                              ) from None
        state = ckpt.load_trainer_state(resume_from)
        run.step, run.samples_seen = state["step"], state["samples_seen"]
        run.micro_batches = state["batches_seen"]
        run.resumed_step = run.step
        sampler.set_position(state["batches_seen"])
        if run.ema is not None and not run.ema.load(resume_from):
            main_print(accelerator, f"{resume_from} has no EMA weights: the average starts from the resumed weights")
        main_print(accelerator, f"resumed from {resume_from} at step {run.step}")
    run.summary.update(trainable_params=trainable, total_params=total, data_workers=workers, decoder_threads=threads)
    main_print(accelerator, f"parameters: trainable {trainable:,} / total {total:,} ({100 * trainable / total:.2f}%)")
    return run


def _earlier_checkpoint_fix(checkpoint: Path) -> str:
    earlier = [p.name for p in ckpt.list_checkpoints(checkpoint.parent) if p.name < checkpoint.name]
    if earlier:
        return (f"resume from the previous one: `ln -sfn {earlier[-1]} {checkpoint.parent / ckpt.LAST}` then --resume "
                f"(or start a new --output-dir)")
    return "no earlier checkpoint is left: start a new --output-dir (or --overwrite)"


def check_checkpoint_files(checkpoint: Path, json_files: list[str], tensor_files: list[str]) -> None:
    """Refuse a damaged checkpoint (truncated or unreadable files) with the way back to an earlier one."""
    fix = f"the checkpoint is damaged; {_earlier_checkpoint_fix(checkpoint)}"
    for name in json_files:
        try:
            json.loads((checkpoint / name).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{checkpoint / name} cannot be read ({type(err).__name__}); {fix}") from None
    for name in tensor_files:
        check_safetensors(checkpoint / name, fix)


def train_step(run: Run, batch: dict[str, Any]) -> tuple[torch.Tensor, float | None]:
    """One micro-batch: forward under autocast, backward, and on the last micro-batch clip, step, schedule.

    Returns this rank's share of the global micro-batch's loss (their mean over ranks is the global masked mean).
    Under DeepSpeed, backward() also clips and steps (with the clip norm written into its config).
    """
    accelerator, model = run.accelerator, run.model
    pcfg = base_policy(accelerator.unwrap_model(model)).config
    noise, time = dist.flow_noise(run.cfg.seed, run.micro_batches, len(batch[OBS_STATE]), accelerator,
                                  pcfg.chunk_size, pcfg.max_action_dim)
    pad = batch.get(ACTION_IS_PAD)
    valid = (~pad).sum() if pad is not None else torch.tensor(batch[ACTION].shape[0] * batch[ACTION].shape[1])
    weight = dist.global_mean_weight(accelerator, valid.to(accelerator.device))
    run.micro_batches += 1
    grad_norm = None
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss, _ = model(batch, noise=noise, time=time)
        loss = loss * weight
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            clip = run.cfg.optim.grad_clip_norm
            norm = accelerator.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
            grad_norm = None if norm is None else float(norm)
            # The norm of the all-reduced gradients: every rank sees the same value and takes the same branch.
            # fp16 runs leave overflow to the grad scaler, which skips those updates itself.
            if grad_norm is not None and not math.isfinite(grad_norm) and accelerator.scaler is None:
                if run.cfg.nonfinite == "stop" or dist.is_deepspeed(accelerator):
                    raise NonFiniteError(run.step + 1, grad_norm, float(loss.detach()))
                run.skipped_updates += 1  # --nonfinite skip: drop this update, keep the schedule moving
                run.optimizer.zero_grad(set_to_none=True)
                run.scheduler.step()
                return loss.detach(), grad_norm
            run.optimizer.step()
            run.scheduler.step()
            if run.ema is not None:
                run.ema.update()
            run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


class NonFiniteError(RuntimeError):
    """A NaN/inf gradient norm at optimizer update `step` (under DeepSpeed the engine has already applied it)."""

    def __init__(self, step: int, grad_norm: float, loss: float):
        super().__init__(f"step {step}: non-finite training (loss {loss}, gradient norm {grad_norm})")
        self.step, self.grad_norm, self.loss = step, grad_norm, loss


EXIT_NONFINITE = 3  # training diverged (NaN/inf); exit 2 is a bad input, 75 a preemption


def make_ema(cfg: TrainConfig, accelerator: Accelerator, model: nn.Module) -> EMA | None:
    if cfg.ema.decay == 0:
        return None
    if dist.zero_stage(accelerator) == 3 or accelerator.distributed_type.value == "FSDP":
        raise ConfigError("--ema.decay needs whole parameters on each rank: it does not run under ZeRO-3/FSDP "
                          "sharding; use ZeRO-1/2 or DDP, or drop --ema.decay")
    return EMA(accelerator.unwrap_model(model), cfg.ema.decay)


def evaluate(run: Run, seed: int = 0) -> float | None:
    """Held-out action MSE with the EMA weights when there are (and --ema.use-for-eval), else the trained ones."""
    if run.ema is not None and run.cfg.ema.use_for_eval:
        with run.ema.applied():
            return _evaluate(run, seed)
    return _evaluate(run, seed)


@torch.no_grad()
def _evaluate(run: Run, seed: int = 0) -> float | None:
    """Held-out action MSE (normalized units, real action dims, in-episode steps), sampled with fixed noise.

    Every rank evaluates its own rows of each fixed batch and the sums are reduced: the same figure with any number
    of processes, computed once, returned on the main process only (None elsewhere).
    """
    if not run.eval_batches:
        return None
    accelerator = run.accelerator
    policy = accelerator.unwrap_model(run.model)
    was_training = policy.training
    policy.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = torch.zeros(2, dtype=torch.float64)  # squared error, element count
    names = list(dict.fromkeys(run.eval_sources))  # several datasets: the same sums per dataset
    per_dataset = torch.zeros(len(names), 2, dtype=torch.float64)
    for index, held in enumerate(run.eval_batches):
        cfg = base_policy(policy).config
        noise = torch.randn(held.size, cfg.chunk_size, cfg.max_action_dim, generator=generator)
        mine = images_to_float(to_device(held.batch, accelerator.device))  # a copy: the kept batch stays uint8
        with dist.autocast(accelerator):
            pred = policy.predict_action_chunk(mine, noise=noise[held.rows].to(accelerator.device))
        valid = (~mine[ACTION_IS_PAD]).unsqueeze(-1).float() * held.weight
        batch_sums = torch.tensor([(((pred.float() - mine[ACTION]) ** 2) * valid).sum().item(),
                                   valid.sum().item() * pred.shape[-1]], dtype=torch.float64)
        sums += batch_sums
        if names:
            per_dataset[names.index(run.eval_sources[index])] += batch_sums
    policy.train(was_training)
    sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    if names:
        per_dataset = accelerator.reduce(per_dataset.to(accelerator.device), reduction="sum").cpu()
        run.eval_by_dataset = {f"eval/action_mse/{name}": (se / n.clamp_min(1)).item()
                               for name, (se, n) in zip(names, per_dataset)}
    return (sums[0] / sums[1].clamp_min(1)).item() if accelerator.is_main_process else None


def save(run: Run) -> Path:
    cfg, accelerator = run.cfg, run.accelerator
    policy = base_policy(accelerator.unwrap_model(run.model))
    accelerate_cfg = os.environ.get("ACCELERATE_CONFIG_FILE_USED") or os.environ.get("ACCELERATE_CONFIG_FILE")
    files = {
        "config.json": policy.config.to_dict(),
        "train_config.json": to_dict(cfg),
        "accelerate_config.yaml": _accelerate_config_text(accelerate_cfg, accelerator),
    }

    def write_model_files(folder: Path) -> None:
        ckpt.write_trained_weights(accelerator.unwrap_model(run.model), folder, save_policy)
        if run.ema is not None:  # ema_state.safetensors (resume) and ema/ (the averaged adapter)
            run.ema.save(folder, lambda f: ckpt.write_trained_weights(accelerator.unwrap_model(run.model), f,
                                                                      save_policy))
        save_stats(run.processor.normalizer.stats, folder)

    state = {"step": run.step, "samples_seen": run.samples_seen, "batches_seen": run.step * cfg.grad_accum_steps,
             **world_of(accelerator)}
    return ckpt.save_checkpoint(accelerator, run.model, run.step, cfg.checkpoints_dir, files, write_model_files,
                                cfg.checkpoint.keep_last, state)


def world_of(accelerator: Accelerator) -> dict[str, Any]:
    """What a resumed run must match or convert: process count, and DDP vs DeepSpeed (with its ZeRO stage)."""
    return {"world_size": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
            "zero_stage": dist.zero_stage(accelerator)}


def _accelerate_config_text(path: str | None, accelerator: Accelerator) -> str:
    ran = "".join(f"#   {k}: {v}\n" for k, v in dist.describe(accelerator).items())
    if path and Path(path).is_file():
        return f"# from {path}\n" + Path(path).read_text().rstrip("\n") + "\n# as run:\n" + ran
    state = accelerator.state
    return (f"# resolved at run time (no config file was passed)\ndistributed_type: {state.distributed_type.value}\n"
            f"num_processes: {state.num_processes}\nmixed_precision: {state.mixed_precision}\n# as run:\n" + ran)


def fit(run: Run) -> dict[str, Any]:
    cfg, accelerator = run.cfg, run.accelerator
    output_dir = Path(cfg.output_dir)
    logger = MetricsLogger(output_dir, enabled=accelerator.is_main_process, resume_step=run.resumed_step,
                           trackers=cfg.log_with, config=flat_fields(cfg))
    if accelerator.is_main_process:
        (output_dir / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    stop = STOP.install()
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not accelerator.is_main_process, desc="train",
               dynamic_ncols=True)
    try:
        if run.resumed_step is None:
            mse = evaluate(run)
            if mse is not None:
                run.summary.setdefault("eval_mse_before", mse)
                logger.log(run.step, {"eval/action_mse": mse, **run.eval_by_dataset})
                main_print(accelerator, f"step {run.step}: held-out action MSE {mse:.4f}")
        elif accelerator.is_main_process:  # the figure before training, as the first attempt logged it
            before = [m["eval/action_mse"] for m in read_metrics(output_dir / "metrics.jsonl")
                      if m.get("step") == 0 and "eval/action_mse" in m]
            if before:
                run.summary["eval_mse_before"] = before[0]
        train_loop(run, logger, bar, stop)
    except NonFiniteError as err:
        err.kept = run.summary.get("checkpoint") or _last_checkpoint(cfg)
        raise
    finally:
        bar.close()
        logger.close()
    if os.environ.get(dist.DEBUG_DUMP_ENV):
        dist.dump_rank_view(accelerator, run.model, output_dir / "debug", run.step)
    return run.summary


def _last_checkpoint(cfg: TrainConfig) -> str | None:
    last = cfg.checkpoints_dir / ckpt.LAST
    return str(last.resolve()) if last.exists() else None


def train_loop(run: Run, logger: MetricsLogger, bar, stop: StopRequest) -> None:
    cfg, accelerator = run.cfg, run.accelerator
    batch_iter = iter(run.train_loader)
    global_batch = cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    tick, tick_step = time.perf_counter(), run.step
    run.model.train()
    while run.step < cfg.steps:
        losses = []
        for _ in range(cfg.grad_accum_steps):
            batch = device_batch(run, next(batch_iter))
            loss, grad_norm = train_step(run, batch)
            losses.append(loss)
        run.step += 1
        run.samples_seen += global_batch
        loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()  # global mean over ranks
        lr = run.scheduler.get_last_lr()[0]
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            elapsed = time.perf_counter() - tick
            throughput = (run.step - tick_step) * global_batch / max(elapsed, 1e-9)
            tick, tick_step = time.perf_counter(), run.step
            values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                      "train/samples_per_s": throughput}
            if run.skipped_updates:
                values["train/skipped_updates"] = run.skipped_updates
            logger.log(run.step, values)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{throughput:.1f}")
        bar.update(1)
        if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
            mse = evaluate(run)
            if mse is not None:
                logger.log(run.step, {"eval/action_mse": mse, **run.eval_by_dataset})
                run.summary["eval_mse_after"] = mse
                bar.write(f"step {run.step}: held-out action MSE {mse:.4f}")
        saved = run.step % cfg.checkpoint.every == 0 or run.step == cfg.steps
        if saved:
            run.summary["checkpoint"] = str(save(run))
        evaluate_in_sim(run, logger)  # --env.type: closed-loop success when due (main process)
        signal_name = stop.agreed(accelerator)  # every rank, every update: all stop at the same step
        if signal_name is not None and run.step < cfg.steps:
            path = Path(run.summary["checkpoint"]) if saved else save(run)
            raise Preempted(run.step, path, signal_name)
    if run.skipped_updates:
        run.summary["skipped_updates"] = run.skipped_updates


# --- closed-loop evaluation in a simulator (--env.type); finetune.envs is simulation, not evaluation reporting ------

def check_sim_env(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Refuse --env.* that cannot run (unknown env or task, simulator extra or assets missing) before any model is
    built, rather than after hours of training."""
    if cfg.env.type is None:
        return
    if not cfg.env.task:
        raise ConfigError(f"--env.type {cfg.env.type} needs --env.task (e.g. libero_spatial, push-v3, MT10)")
    if cfg.env.episodes < 1 or cfg.env.eval_every < 0:
        raise ConfigError("--env.episodes must be >= 1 and --env.eval-every >= 0 (0: only at the end)")
    if dist.zero_stage(accelerator) == 3:
        raise ConfigError("--env.type: simulator evaluation runs the policy on one process, which ZeRO-3's sharded "
                          "weights do not allow; use a ZeRO-1/2 or DDP config, or evaluate the checkpoint afterwards")
    try:
        from finetune.envs import check_env, default_tasks
    except ImportError:
        raise ConfigError(f"--env.type {cfg.env.type}: this install has no simulator support (finetune.envs); "
                          "update the suite or drop --env.type") from None
    try:
        check_env(cfg.env.type, default_tasks(cfg.env.type, cfg.env.task))
    except (ValueError, RuntimeError) as err:  # unknown env/task; EnvUnavailable: extra or assets missing
        raise ConfigError(f"--env.type {cfg.env.type} --env.task {cfg.env.task}: {err}") from None


def make_action_chunk_fn(run: Run, seed: int):
    """The policy being trained as a batched finetune.envs ActionChunkFn: (env observations, instructions) ->
    (B, chunk, action_dim) actions in robot units (normalization undone), with seeded sampling noise."""
    policy = run.accelerator.unwrap_model(run.model)
    pcfg = base_policy(policy).config
    rename, device = run.cfg.dataset.rename_map, run.accelerator.device
    generator = torch.Generator().manual_seed(seed)

    def act(observations: list[dict[str, np.ndarray]], instructions: list[str]) -> np.ndarray:
        obs = [{rename.get(k, k): v for k, v in o.items()} for o in observations]
        if OBS_STATE not in obs[0]:
            raise ConfigError(f"--env.type {run.cfg.env.type}: the simulator's observation has no {OBS_STATE!r} "
                              f"({sorted(observations[0])}); map its keys with --dataset.rename-map")
        batch: dict[str, Any] = {  # (B, H, W, 3) uint8 -> (B, 3, H, W) in [0, 1], as the dataset's frames
            k: torch.as_tensor(np.stack([o[k] for o in obs])).permute(0, 3, 1, 2).float() / 255
            for k in pcfg.image_features if k in obs[0]}
        batch[OBS_STATE] = torch.as_tensor(np.stack([np.asarray(o[OBS_STATE], np.float32).reshape(-1) for o in obs]))
        batch[TASK] = list(instructions)
        batch = to_device(run.processor.prepare(batch), device)
        noise = torch.randn(len(obs), pcfg.chunk_size, pcfg.max_action_dim, generator=generator).to(device)
        with dist.autocast(run.accelerator):
            chunk = policy.predict_action_chunk(batch, noise=noise)
        return run.processor.unnormalize_actions(chunk.float().cpu()).numpy()

    return act


def sim_image_size(run: Run) -> int:
    pcfg = base_policy(run.accelerator.unwrap_model(run.model)).config
    cameras = [pcfg.input_features[k]["shape"] for k in pcfg.image_features]
    return run.cfg.env.image_size or (cameras[0][1] if cameras else 128)  # as the dataset's camera


def check_policy_fits_sim(run: Run) -> bool:
    """The simulator gives the policy's cameras (after --dataset.rename-map), state size and action size."""
    from finetune.envs import default_tasks, make_env, rollout

    cfg = run.cfg
    pcfg = base_policy(run.accelerator.unwrap_model(run.model)).config
    env_names = {v: k for k, v in cfg.dataset.rename_map.items()}  # policy name -> the env's (dataset's) name
    env = make_env(cfg.env.type, default_tasks(cfg.env.type, cfg.env.task)[0], image_size=sim_image_size(run))
    try:
        rollout.check_policy_fits_env(env, [env_names.get(k, k) for k in pcfg.image_features], pcfg.state_dim,
                                      pcfg.action_dim)
    except ValueError as err:
        raise ConfigError(f"--env.type {cfg.env.type} --env.task {cfg.env.task}: {err}") from None
    finally:
        env.close()
    return True


def evaluate_in_sim(run: Run, logger: MetricsLogger) -> None:
    """--env.type: success rate of the policy in the simulator at the end and every --env.eval-every updates."""
    cfg, accelerator = run.cfg, run.accelerator
    if cfg.env.type is not None and "sim_fits" not in run.summary and accelerator.is_main_process:
        run.summary["sim_fits"] = check_policy_fits_sim(run)  # after the first update, not after hours
    due = run.step == cfg.steps or (cfg.env.eval_every > 0 and run.step % cfg.env.eval_every == 0)
    if cfg.env.type is None or not due:
        return
    if accelerator.is_main_process:
        from finetune.envs import default_tasks, rollout

        policy = accelerator.unwrap_model(run.model)
        pcfg = base_policy(policy).config
        was_training = policy.training
        policy.eval()
        with torch.no_grad():
            result = rollout.run_closed_loop(make_action_chunk_fn(run, cfg.seed), cfg.env.type,
                                             default_tasks(cfg.env.type, cfg.env.task), cfg.env.episodes,
                                             seed=cfg.seed, n_action_steps=pcfg.n_action_steps,
                                             image_size=sim_image_size(run), max_steps=cfg.env.max_steps,
                                             batched=True)
        policy.train(was_training)
        per_task = result["per_task"]
        logger.log(run.step, {"sim/success_rate": result["success_rate"],
                              **{f"sim/{task}/success_rate": r["success_rate"] for task, r in per_task.items()}})
        run.summary["sim_success_rate"] = result["success_rate"]
        episodes = sum(r["episodes"] for r in per_task.values())
        accelerator.print(f"step {run.step}: {cfg.env.type} {cfg.env.task} success rate {result['success_rate']:.1%} "
                          f"({episodes} episodes)")
    accelerator.wait_for_everyone()


def report(run: Run) -> None:
    """Sizes and the before/after figures, printed once at the end by the main process (which wrote the files)."""
    s = run.summary
    if not run.accelerator.is_main_process or "checkpoint" not in s:
        return
    out = Path(s["checkpoint"])
    trained = sum(p.stat().st_size for p in out.glob("*.safetensors") if "normalization" not in p.name)
    base = (run.policy_dir / "model.safetensors").stat().st_size
    lines = [f"checkpoint: {out}", f"trained weights: {trained / 2**20:.2f} MiB; base model: {base / 2**20:.2f} MiB "
             f"({100 * trained / base:.1f}%)"]
    if "eval_mse_before" in s and "eval_mse_after" in s:
        lines.append(f"held-out action MSE: before {s['eval_mse_before']:.4f} -> after {s['eval_mse_after']:.4f} "
                     f"({s['eval_mse_before'] / max(s['eval_mse_after'], 1e-12):.1f}x lower)")
    if s.get("skipped_updates"):
        lines.append(f"skipped updates (non-finite loss/gradient): {s['skipped_updates']}")
    print("\n".join(lines), flush=True)
    s.update(trained_bytes=trained, base_bytes=base)


def run_training(cfg: TrainConfig, accelerator: Accelerator) -> dict[str, Any]:
    run = setup(cfg, accelerator)
    try:
        summary = fit(run)
        report(run)
    finally:
        accelerator.free_memory()
        accelerator._custom_objects.clear()  # the next run in this process registers its own scheduler
    return summary


# --- the output folder: one run per folder ---------------------------------------------------------------------------


def _on_main(accelerator: Accelerator, decide) -> Any:
    """Run `decide()` on the main process (which owns the folder) and hand its result, or its ConfigError, to every
    rank, so all ranks raise or continue together even when they do not share a filesystem."""
    result: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            result = [("ok", decide())]
        except ConfigError as err:
            result = [("error", str(err))]
    if accelerator.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    kind, value = result[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def resolve_resume(cfg: TrainConfig, accelerator: Accelerator) -> TrainConfig:
    """`--resume auto` -> resume when checkpoints/last exists, else a fresh run (decided by the main process)."""
    if cfg.resume != RESUME_AUTO:
        return cfg
    found = _on_main(accelerator, lambda: (cfg.checkpoints_dir / ckpt.LAST).exists())
    what = f"resuming from {cfg.checkpoints_dir / ckpt.LAST}" if found else \
        f"no checkpoint in {cfg.checkpoints_dir}, starting fresh"
    main_print(accelerator, f"--resume auto: {what}")
    return dataclasses.replace(cfg, resume=bool(found))


def claim_output_dir(cfg: TrainConfig, accelerator: Accelerator, auto: bool) -> None:
    """A fresh run needs an empty output folder: refuse one holding another run, or move it aside (--overwrite; the
    demo always starts over). With --resume auto and no checkpoint, the partial logs of the same run are dropped."""

    def decide() -> None:
        out = Path(cfg.output_dir)
        if not out.is_dir() or not any(out.iterdir()):
            return
        if cfg.overwrite or cfg.demo.enabled:
            aside = out.with_name(out.name + ".previous") if cfg.demo.enabled else \
                out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            note = ""
            if aside.exists():
                shutil.rmtree(aside)
                note = f" (replacing the older {aside})"
            out.rename(aside)
            what = "demo: starting over in" if cfg.demo.enabled else "--overwrite: starting a new run in"
            print(f"{what} {out}; the previous run there was moved to {aside}{note}", flush=True)
            return
        saved = out / "train_config.json"
        if auto and saved.is_file() and not (cfg.checkpoints_dir / ckpt.LAST).exists():
            try:
                same = not trajectory_changes(from_dict(json.loads(saved.read_text())), cfg)
            except (json.JSONDecodeError, TypeError, ValueError):
                same = False
            if same:  # the same run stopped before its first checkpoint: its logs are retrained from step 0
                for name in ("metrics.jsonl", "tensorboard"):
                    path = out / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                print(f"--resume auto: {out} holds the same run stopped before its first checkpoint; "
                      "starting it again from step 0 (its partial metrics were dropped)", flush=True)
                return
        held = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())[:4])
        raise ConfigError(f"--output-dir {out} is not empty ({held}): continue that run with --resume (or --resume "
                          "auto), choose a new --output-dir, or pass --overwrite to move the old run aside "
                          f"(to {out.name}.old-<time>) and start over")

    _on_main(accelerator, decide)


def check_resume(cfg: TrainConfig, accelerator: Accelerator) -> dict[str, Any]:
    """Refuse, before anything is built, a resume whose configuration or topology would change the training
    trajectory; return the checkpoint's trainer state."""

    def decide() -> dict[str, Any]:
        last = ckpt.resolve_last(cfg.checkpoints_dir)
        try:
            saved = from_dict(json.loads((last / "train_config.json").read_text()))
            state = ckpt.load_trainer_state(last)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise ConfigError(f"{last}: train_config.json / {ckpt.TRAINER_STATE_FILE} cannot be read "
                              f"({type(err).__name__}); {_earlier_checkpoint_fix(last)}") from None
        # default mixture weights resolve to the saved ones from the same datasets
        weights = ("dataset.weights",) if cfg.dataset.weights is None else ()
        changes = trajectory_changes(saved, cfg, ignore=("batch_size", *weights))
        changes += topology_changes(saved, state, cfg, accelerator)
        if changes:
            raise ConfigError(f"--resume: {last} was trained with other settings that shape training: "
                              f"{'; '.join(changes)}. Resume with the checkpoint's values or start a new --output-dir")
        return {**state, "checkpoint": str(last)}

    return _on_main(accelerator, decide)


def topology_changes(saved: TrainConfig, state: dict[str, Any], cfg: TrainConfig, accelerator: Accelerator) -> list:
    """A resumed run continues the same trajectory when each global micro-batch (micro-batch x processes) is the same:
    the sampler position and the flow-matching noise are indexed by global micro-batch. DDP and one process keep a
    full optimizer state on every rank, so their process count may change; a ZeRO-sharded state may not."""
    world = state.get("world_size")
    if world is None:  # a checkpoint from before world sizes were recorded
        return [f"--batch-size: {saved.batch_size} -> {cfg.batch_size}"] if saved.batch_size != cfg.batch_size else []
    out = []
    then, now = saved.batch_size * world, cfg.batch_size * accelerator.num_processes
    if then != now:
        keep = then / accelerator.num_processes
        hint = f"pass --batch-size {int(keep)}" if keep == int(keep) else f"use a process count dividing {then}"
        out.append(f"global micro-batch: {saved.batch_size} x {world} process(es) = {then} at save, now "
                   f"{cfg.batch_size} x {accelerator.num_processes} = {now} ({hint} to keep the batch and the data "
                   "position)")
    was = (state.get("distributed_type"), state.get("zero_stage"))
    ds_now = dist.is_deepspeed(accelerator)
    if (was[0] == "DEEPSPEED") != ds_now or (ds_now and was[1] != dist.zero_stage(accelerator)):
        out.append(f"topology: saved under {was[0]}{f' ZeRO-{was[1]}' if was[1] is not None else ''}, now "
                   f"{accelerator.distributed_type.value}; the optimizer state is stored differently, resume with the "
                   "checkpoint's accelerate config")
    elif ds_now and world != accelerator.num_processes:
        out.append(f"processes: {world} at save, now {accelerator.num_processes}; the optimizer state is sharded by "
                   f"ZeRO over {world} ranks: resume with {world} processes")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    is_main = int(os.environ.get("RANK", "0")) == 0
    cfg = cli(argv, console_outputs=is_main)
    accelerator = None
    STOP.install()  # from the start: a preemption during setup stops the run after its first update
    try:
        validate(cfg)
        check_trackers(cfg.log_with)
        check_push_access(cfg)  # offline or logged out: fail now, not after training
        accelerator = make_accelerator(cfg)
        dist.check_distributed_support(cfg, accelerator)
        if cfg.nonfinite == "skip" and dist.is_deepspeed(accelerator):
            raise ConfigError("--nonfinite skip is not supported under DeepSpeed: its engine applies the update "
                              "inside backward(), before the gradient norm can be checked; use --nonfinite stop")
        check_sim_env(cfg, accelerator)
        auto = cfg.resume == RESUME_AUTO
        cfg = resolve_resume(cfg, accelerator)
        if not cfg.resume:
            claim_output_dir(cfg, accelerator, auto)
        dist.check_shared_output_dir(accelerator, Path(cfg.output_dir))
        if cfg.demo.enabled:
            from finetune.demo import prepare_demo

            cfg = prepare_demo(cfg, accelerator, run_training)
        if cfg.resume:
            state = check_resume(cfg, accelerator)
            if state["step"] >= cfg.steps:
                main_print(accelerator, f"{state['checkpoint']} already reached step {state['step']} (--steps "
                                        f"{cfg.steps}): nothing to train. Pass a larger --steps to continue.")
                return {"checkpoint": state["checkpoint"], "step": state["step"], "finished": True}
        summary = run_training(cfg, accelerator)
        if cfg.demo.enabled and accelerator.is_main_process:
            from finetune.demo import report_closed_loop

            report_closed_loop(cfg, summary)  # the demo's own report: success before/after in its simulated task
        if push_repo_ids(cfg) and accelerator.is_main_process:
            push_run(cfg, summary)
        return summary
    except (ConfigError, DatasetError, FileNotFoundError, CheckpointWriteError) as err:
        if accelerator is None or accelerator.is_local_main_process:  # once in each node's log
            print(f"error: {err}", file=sys.stderr)
        write_status("exit 2")  # the real status still ends the workers, so torchrun stops the other ranks
        raise SystemExit(2) from None
    except Preempted as stopped:
        if accelerator is None or accelerator.is_main_process:
            print(f"preempted: {stopped}; continue with --resume auto", file=sys.stderr, flush=True)
        raise SystemExit(report_preempted()) from None
    except NonFiniteError as err:
        kept = getattr(err, "kept", None)
        applied = "DeepSpeed had applied the update; the run stopped before saving it" if accelerator is not None \
            and dist.is_deepspeed(accelerator) else "the update was not applied"
        if accelerator is None or accelerator.is_main_process:
            print(f"error: {err}; {applied}, and the last good checkpoint "
                  f"{kept or '(none yet)'} is kept. Lower --optim.lr, check the data for NaN/inf, or pass --nonfinite "
                  "skip to skip such updates", file=sys.stderr, flush=True)
        write_status(f"exit {EXIT_NONFINITE}")
        raise SystemExit(EXIT_NONFINITE) from None
    finally:
        STOP.uninstall()


def cli_main() -> None:
    """Console-script entry (finetune-train): exit status 0 on success."""
    main()


if __name__ == "__main__":
    cli_main()
