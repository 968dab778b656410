"""Builds what a run reads: the dataset mixture, the processor (tokenizer + normalization stats), the training loader
with its resumable sampler, and the fixed held-out batches."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from finetune.config import TrainConfig
from finetune.data import LeRobotDataset, workers
from finetune.data.check import check_for_training
from finetune.data.multi import DataMix, MixtureDataset, WeightedMixtureSampler
from finetune.data.stats import aggregate_stats, relative_action_stats
from finetune.hub import load_tokenizer, resolve_repo
from finetune.logs import rank
from finetune.policies.base import ACTION, OBS_STATE
from finetune.policies.processor import PolicyProcessor
from finetune.policies.relative_actions import config_mask, uses_relative_actions
from finetune.training.evaluation import EvalBatch, fixed_eval_batches
from finetune.training.preemption import ignore_stop_signals
from finetune.training.sampling import ResumableBatchSampler

log = logging.getLogger(__name__)


def load_data_mix(cfg: TrainConfig) -> tuple[TrainConfig, DataMix]:
    """One dataset or several (--dataset.root A B), checked to line up and by finetune-check's quick checks (errors
    stop the run, warnings are logged by the main rank); with several, the config records each one's resolved weight
    (so train_config.json says what ran)."""
    mix = DataMix.load(cfg.dataset, lambda hub_id: resolve_repo(hub_id, "dataset", "--dataset.root"))
    for source in mix.sources:  # every rank stops on an error; one reports the warnings
        check_for_training(source.root, log.warning if rank() == 0 else lambda _: None,
                           tolerance_s=cfg.dataset.tolerance_s)
    if len(mix) > 1:
        cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, weights=tuple(mix.weights)))
    return cfg, mix


def build_processor(cfg: TrainConfig, policy: nn.Module, policy_dir: Path, mix: DataMix) -> PolicyProcessor:
    """Tokenizer and normalization: the datasets' merged stats, with action stats on the relative actions when the
    policy learns those."""
    tokenizer = load_tokenizer(policy_dir, cfg.policy.tokenizer_path, policy.config.tokenizer_name)
    stats = {cfg.dataset.rename_map.get(k, k): v for k, v in mix.merged_meta().stats.items()}
    if uses_relative_actions(policy.config):
        stats[ACTION] = aggregate_stats([{ACTION: relative_action_stats(
            s.root, policy.config.chunk_size, config_mask(policy.config), s.source_key(OBS_STATE),
            s.source_key(ACTION))} for s in mix.sources])[ACTION]
    return PolicyProcessor(policy.config, tokenizer, stats, cfg.dataset.rename_map)


@dataclass
class TrainData:
    loader: DataLoader
    sampler: ResumableBatchSampler | WeightedMixtureSampler
    eval_batches: list[EvalBatch]
    eval_sources: list[str]  # with several datasets: each eval batch's dataset (empty with one)
    workers: int
    decoder_threads: int
    cache_bytes: int  # each training loader process's decoded-frame cache


def build_data(cfg: TrainConfig, mix: DataMix, processor: PolicyProcessor, chunk_size: int,
               accelerator: Accelerator) -> TrainData:
    """Training loader over the training episodes of every dataset (weighted when several) and held-out batches from
    the last --dataset.eval-episodes of each."""
    splits = mix.splits(cfg.dataset.episodes, cfg.dataset.eval_episodes)
    local_ranks = workers.local_world_size(accelerator.num_processes)
    num_workers = workers.resolve_num_workers(cfg.dataset.num_workers, local_ranks)
    threads = cfg.dataset.decoder_threads or workers.default_decoder_threads(workers.available_cpus(), local_ranks,
                                                                             num_workers)
    cache = workers.cache_bytes_per_process(cfg.dataset.video_cache_mb, local_ranks, num_workers)
    data_kwargs = dict(video_cache_bytes=cache, uint8_images=True, decoder_threads=threads,
                       tolerance_s=cfg.dataset.tolerance_s)
    members = [LeRobotDataset(s.root, chunk_size, episodes=train, keys=s.keys, **data_kwargs)
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
                        **workers.loader_kwargs(num_workers, accelerator.device, cfg.dataset.prefetch_factor,
                                                worker_init_fn=ignore_stop_signals))
    eval_batches, eval_sources = [], []
    for source, (_, eval_eps) in zip(mix.sources, splits):
        if not eval_eps:
            continue
        # on every rank: each evaluates its own rows (and under ZeRO-3 all must run the forward passes)
        eval_set = MixtureDataset([LeRobotDataset(source.root, chunk_size, episodes=eval_eps, keys=source.keys,
                                                  **(data_kwargs | {"video_cache_bytes": 0}))], [source.rename])
        # global-batch-sized, so the figure is the same whatever the number of processes
        held = fixed_eval_batches(eval_set, processor, cfg.batch_size * accelerator.num_processes, cfg.eval_batches,
                                  accelerator)
        eval_batches += held
        eval_sources += [source.name] * len(held) if len(mix) > 1 else []
    return TrainData(loader, sampler, eval_batches, eval_sources, num_workers, threads, cache)
