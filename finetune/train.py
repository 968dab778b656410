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
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune import checkpoint as ckpt
from finetune import distributed as dist
from finetune import relative_actions
from finetune.adapters import (
    apply_adapter,
    base_policy,
    count_parameters,
    load_adapter,
    resolve_full_training_modules,
)
from finetune.config import ConfigError, TrainConfig, cli, from_dict, to_dict, validate
from finetune.data import DatasetError, LeRobotDataset, loading
from finetune.data.multi import DataMix, MixtureDataset, WeightedMixtureSampler
from finetune.data.stats import aggregate_stats, check_stats, needed_stats
from finetune.data.transforms import ImageTransforms
from finetune.ema import EMA
from finetune.hub import load_tokenizer, resolve_repo
from finetune.metrics import MetricsLogger
from finetune.policies import load_policy, load_policy_config, save_policy
from finetune.policies.base import ACTION, ACTION_IS_PAD, OBS_STATE
from finetune.processor import PolicyProcessor, image_keys, images_to_float, save_stats
from finetune.publish import check_push_access, push_repo_ids, push_run
from finetune.quant import enable_input_require_grads, quantize_policy
from finetune.sampling import ResumableBatchSampler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum_steps,
        mixed_precision=_mixed_precision(cfg),
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


def load_base_policy(cfg: TrainConfig, policy_dir: Path, meta) -> nn.Module:
    overrides = {k: v for k, v in (("chunk_size", cfg.policy.chunk_size), ("num_steps", cfg.policy.num_steps))
                 if v is not None}
    policy = load_policy(policy_dir, dtype=DTYPES[cfg.policy.dtype], **overrides)
    inputs, outputs = policy_features(meta, cfg.dataset.rename_map)
    pcfg = policy.config
    if inputs[OBS_STATE]["shape"][0] > getattr(pcfg, "max_state_dim", 1 << 30):
        raise ConfigError(f"the dataset's state has {inputs[OBS_STATE]['shape'][0]} dims, more than the policy's "
                          f"max_state_dim {pcfg.max_state_dim}")
    if outputs[ACTION]["shape"][0] > getattr(pcfg, "max_action_dim", 1 << 30):
        raise ConfigError(f"the dataset's action has {outputs[ACTION]['shape'][0]} dims, more than the policy's "
                          f"max_action_dim {pcfg.max_action_dim}")
    pcfg.input_features, pcfg.output_features = inputs, outputs  # as LeRobot: features come from the dataset
    error = relative_actions.configure(pcfg, cfg.policy.use_relative_actions, cfg.policy.relative_exclude_joints,
                                       relative_actions.action_names(meta.features[ACTION]))
    if error:
        raise ConfigError(error)
    policy.set_gradient_checkpointing(cfg.policy.gradient_checkpointing)
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
    # One dataset or several (--dataset.root A B): checked to line up, stats merged across them.
    mix = DataMix.load(cfg.dataset, lambda hub_id: resolve_repo(hub_id, "dataset", "--dataset.root"))
    if len(mix) > 1:  # the train config records every dataset and its resolved weight
        cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, weights=tuple(mix.weights)))
    meta = mix.merged_meta()
    # Missing stats: stop now, before any model is built, and say which command adds them.
    needed = needed_stats(load_policy_config(policy_dir).normalization_mapping)
    if cfg.policy.use_relative_actions or (cfg.policy.use_relative_actions is None and relative_actions.
                                           uses_relative_actions(load_policy_config(policy_dir))):
        needed.pop(ACTION)  # computed below on the relative actions
    for source in mix.sources:
        check_stats({cfg.dataset.rename_map.get(k, k): v for k, v in source.view.stats.items()}, needed, source.root)
    policy = load_base_policy(cfg, policy_dir, meta)
    if cfg.quant.enabled:
        keep = resolve_full_training_modules(policy, cfg.peft.full_training_modules)
        policy = quantize_policy(policy, cfg.quant, accelerator.device, keep)
        enable_input_require_grads(policy)
    tokenizer = load_tokenizer(policy_dir, cfg.policy.tokenizer_path, policy.config.tokenizer_name)
    stats = {cfg.dataset.rename_map.get(k, k): v for k, v in meta.stats.items()}
    if relative_actions.uses_relative_actions(policy.config):  # normalize what the policy learns: relative actions
        stats[ACTION] = aggregate_stats([{ACTION: relative_actions.relative_action_stats(
            s.root, policy.config.chunk_size, relative_actions.config_mask(policy.config), s.source_key(OBS_STATE),
            s.source_key(ACTION))} for s in mix.sources])[ACTION]
    processor = PolicyProcessor(policy.config, tokenizer, stats, cfg.dataset.rename_map)

    resume_from = ckpt.resolve_last(cfg.checkpoints_dir) if cfg.resume else None
    if resume_from is not None and (resume_from / "adapter_config.json").is_file():
        model = load_adapter(policy, resume_from, trainable=True)  # the saved adapter itself, not a fresh one
    elif resume_from is not None:
        model = load_policy(resume_from)  # a FULL run: its checkpoint holds the whole policy
        model.config.input_features, model.config.output_features = policy.config.input_features, \
            policy.config.output_features
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = apply_adapter(policy, cfg.peft)
    for p in model.parameters():  # trained parameters in float32 whatever the base's storage dtype
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()

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
        accelerator.load_state(str(resume_from / ckpt.TRAINING_STATE_DIR), **dist.load_state_kwargs(accelerator))
        state = ckpt.load_trainer_state(resume_from)
        run.step, run.samples_seen = state["step"], state["samples_seen"]
        run.micro_batches = state["batches_seen"]
        sampler.set_position(state["batches_seen"])
        if run.ema is not None and not run.ema.load(resume_from):
            accelerator.print(f"{resume_from} has no EMA weights: the average starts from the resumed weights")
        accelerator.print(f"resumed from {resume_from} at step {run.step}")
    run.summary.update(trainable_params=trainable, total_params=total, data_workers=workers, decoder_threads=threads)
    accelerator.print(f"parameters: trainable {trainable:,} / total {total:,} ({100 * trainable / total:.2f}%)")
    return run


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
            if run.cfg.optim.grad_clip_norm > 0:
                norm = accelerator.clip_grad_norm_(model.parameters(), run.cfg.optim.grad_clip_norm)
                grad_norm = None if norm is None else float(norm)
            run.optimizer.step()
            run.scheduler.step()
            if run.ema is not None:
                run.ema.update()
            run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


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

    state = {"step": run.step, "samples_seen": run.samples_seen, "batches_seen": run.step * cfg.grad_accum_steps}
    return ckpt.save_checkpoint(accelerator, run.model, run.step, cfg.checkpoints_dir, files, write_model_files,
                                cfg.checkpoint.keep_last, state)


def _accelerate_config_text(path: str | None, accelerator: Accelerator) -> str:
    ran = "".join(f"#   {k}: {v}\n" for k, v in dist.describe(accelerator).items())
    if path and Path(path).is_file():
        return f"# from {path}\n" + Path(path).read_text().rstrip("\n") + "\n# as run:\n" + ran
    state = accelerator.state
    return (f"# resolved at run time (no config file was passed)\ndistributed_type: {state.distributed_type.value}\n"
            f"num_processes: {state.num_processes}\nmixed_precision: {state.mixed_precision}\n# as run:\n" + ran)


def fit(run: Run) -> dict[str, Any]:
    cfg, accelerator = run.cfg, run.accelerator
    logger = MetricsLogger(Path(cfg.output_dir), enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    mse = evaluate(run)
    if mse is not None:
        run.summary.setdefault("eval_mse_before", mse)
        logger.log(run.step, {"eval/action_mse": mse, **run.eval_by_dataset})
        accelerator.print(f"step {run.step}: held-out action MSE {mse:.4f}")
    batch_iter = iter(run.train_loader)
    global_batch = cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not accelerator.is_main_process, desc="train",
               dynamic_ncols=True)
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
            logger.log(run.step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                  "train/samples_per_s": throughput})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{throughput:.1f}")
        bar.update(1)
        if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
            mse = evaluate(run)
            if mse is not None:
                logger.log(run.step, {"eval/action_mse": mse, **run.eval_by_dataset})
                run.summary["eval_mse_after"] = mse
                bar.write(f"step {run.step}: held-out action MSE {mse:.4f}")
        if run.step % cfg.checkpoint.every == 0 or run.step == cfg.steps:
            run.summary["checkpoint"] = str(save(run))
    if os.environ.get(dist.DEBUG_DUMP_ENV):
        dist.dump_rank_view(accelerator, run.model, Path(cfg.output_dir) / "debug", run.step)
    bar.close()
    logger.close()
    return run.summary


def report(run: Run) -> None:
    """Sizes and the before/after figures, printed once at the end."""
    s = run.summary
    out = Path(s["checkpoint"])
    trained = sum(p.stat().st_size for p in out.glob("*.safetensors") if "normalization" not in p.name)
    base = (run.policy_dir / "model.safetensors").stat().st_size
    lines = [f"checkpoint: {out}", f"trained weights: {trained / 2**20:.2f} MiB; base model: {base / 2**20:.2f} MiB "
             f"({100 * trained / base:.1f}%)"]
    if "eval_mse_before" in s and "eval_mse_after" in s:
        lines.append(f"held-out action MSE: before {s['eval_mse_before']:.4f} -> after {s['eval_mse_after']:.4f} "
                     f"({s['eval_mse_before'] / max(s['eval_mse_after'], 1e-12):.1f}x lower)")
    run.accelerator.print("\n".join(lines))
    s.update(trained_bytes=trained, base_bytes=base)


def run_training(cfg: TrainConfig, accelerator: Accelerator) -> dict[str, Any]:
    run = setup(cfg, accelerator)
    summary = fit(run)
    report(run)
    accelerator.free_memory()
    accelerator._custom_objects.clear()  # the next run in this process registers its own scheduler
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    is_main = int(os.environ.get("RANK", "0")) == 0
    cfg = cli(argv, console_outputs=is_main)
    try:
        validate(cfg)
        check_push_access(cfg)  # offline or logged out: fail now, not after training
        accelerator = make_accelerator(cfg)
        dist.check_distributed_support(cfg, accelerator)
        if cfg.demo.enabled:
            from finetune.demo import prepare_demo

            cfg = prepare_demo(cfg, accelerator, run_training)
        if cfg.resume:
            saved = from_dict(json.loads((ckpt.resolve_last(cfg.checkpoints_dir) / "train_config.json").read_text()))
            if saved.peft != cfg.peft:
                raise ConfigError("--resume with different --peft.* options than the checkpoint: resume keeps the "
                                  f"saved adapter ({saved.peft}); drop the PEFT flags or start a new output dir")
        summary = run_training(cfg, accelerator)
        if cfg.demo.enabled and accelerator.is_main_process:
            from finetune.eval import demo_closed_loop_report

            demo_closed_loop_report(cfg, summary)  # success rate before/after in the simulated task
        if push_repo_ids(cfg) and accelerator.is_main_process:
            push_run(cfg, summary)
        return summary
    except (ConfigError, DatasetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_main() -> None:
    """Console-script entry (finetune-train): exit status 0 on success."""
    main()


if __name__ == "__main__":
    cli_main()
