"""What the training loop needs to run the same under one process, DDP and DeepSpeed ZeRO-1/2/3.

Topology, ZeRO stage and offload live in `accelerate_configs/*.yaml`; the training config owns the micro-batch size,
gradient accumulation and clipping, and `fill_deepspeed_config` writes them into DeepSpeed's config so the two never
disagree. `check_distributed_support` refuses, at start and with the reason, the combinations that cannot work.

Runs with W processes reproduce a one-process run with W times the batch (up to float reduction order):
- rank r trains on slice r of each global micro-batch (`ResumableBatchSampler`) and draws the flow-matching noise and
  time of that slice from a generator seeded by the global micro-batch index (`flow_noise`), so every sample gets the
  same noise whatever the world size;
- each rank's masked-mean loss is rescaled by its share of the valid action elements (`global_mean_weight`), so the
  gradient average over ranks is the masked mean over the global micro-batch, as one process computes it.

Under ZeRO-3 each rank holds a shard of every parameter: saving the adapter gathers the trained parameters first
(`gathered`), and evaluation runs on every rank (each on its own rows, sums reduced) because every forward pass
needs all ranks to gather the layers it uses.

A rank that dies ends the job (the launcher stops the others); a rank that hangs makes the others' next collective
fail after FINETUNE_DIST_TIMEOUT_S seconds (default 1800), so the job exits non-zero instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch import nn

from finetune.config import ConfigError, TrainConfig
from finetune.policies.common import sample_flow_time
from finetune.quant import check_quantized_topology

# Debug hook (tests): when set, every rank writes its gathered view of the trained tensors and the world it ran in to
# <output_dir>/debug/rank<r>.safetensors and rank<r>.json at the end of the run, so ranks can be compared.
DEBUG_DUMP_ENV = "FINETUNE_DEBUG_RANK_DUMP"
# Seconds a collective may wait for the other ranks before the process group fails (then every rank exits non-zero).
TIMEOUT_ENV = "FINETUNE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT = timedelta(minutes=30)


def process_group_timeout() -> timedelta:
    value = os.environ.get(TIMEOUT_ENV)
    return timedelta(seconds=float(value)) if value else DEFAULT_TIMEOUT


def _mixed_precision(cfg: TrainConfig) -> str | None:
    """--mixed-precision, else autocast in the dtype of a half-precision base (its frozen layers would otherwise meet
    fp32 inputs), else whatever the accelerate config says."""
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision
    return {"bfloat16": "bf16", "float16": "fp16"}.get(cfg.policy.dtype)


def exclude_model_weights_from_state(accelerator: Accelerator) -> None:
    """Make Accelerate's save_state/load_state skip the model: its trained part is saved as the adapter instead,
    so training_state/ never holds a copy of the frozen base."""

    def drop_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def drop_models(models: list, input_dir: str) -> None:
        models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(drop_models)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator: gloo for CPU ranks, a collective timeout, the run's own precision, and the model kept
    out of Accelerate's saved state (the checkpoint holds the trained weights itself)."""
    kwargs: dict[str, Any] = {"timeout": process_group_timeout()}  # a stuck collective fails, never hangs
    cpu_ranks = not torch.cuda.is_available() and launched_world_size() > 1
    if cpu_ranks:
        kwargs["backend"] = "gloo"  # CPU ranks: without it DeepSpeed ranks silently run alone
    mixed_precision = _mixed_precision(cfg)
    # Another run earlier in this process (a notebook, the tests) may have used another precision: Accelerate keeps
    # one process-wide state and refuses the change, so that part starts over (the process group is kept).
    wanted = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # None: the launch config's
    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != wanted and not wants_deepspeed():  # DeepSpeed records "no" and casts itself
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum_steps,
        mixed_precision=mixed_precision,
        cpu=cpu_ranks and not wants_deepspeed(),  # CPU DDP (MULTI_CPU); cpu=True would switch DeepSpeed off
        kwargs_handlers=[InitProcessGroupKwargs(**kwargs)],
    )
    exclude_model_weights_from_state(accelerator)
    build_models_whole(accelerator)
    return accelerator


def launched_world_size() -> int:
    """Processes the launcher started (torchrun's WORLD_SIZE), whatever Accelerate made of them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wants_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int | None:
    """The ZeRO stage under DeepSpeed, None otherwise."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def describe(accelerator: Accelerator) -> dict[str, Any]:
    """The topology the run actually got (not the one the config file asked for)."""
    state = accelerator.state
    mixed = state.mixed_precision
    if is_deepspeed(accelerator):
        ds = state.deepspeed_plugin.deepspeed_config
        mixed = "bf16" if ds.get("bf16", {}).get("enabled") or ds.get("torch_autocast", {}).get("enabled") else \
            "fp16" if ds.get("fp16", {}).get("enabled") else "no"
    return {"distributed_type": state.distributed_type.value, "num_processes": state.num_processes,
            "zero_stage": zero_stage(accelerator), "mixed_precision": mixed}


def check_distributed_support(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Refuse, before anything is built, a topology and config that would fail or silently train wrong.

    Extend here (e.g. a quantized base under ZeRO-3/FSDP); raise ConfigError with the reason and the fix.
    """
    launched = launched_world_size()
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(
            f"the launcher started {launched} processes but Accelerate sees {accelerator.num_processes}: each rank "
            "would train alone (no data sharding, no gradient sync). On CPU use accelerate_configs/cpu_*.yaml, "
            "which train.py sets up with the gloo backend")
    if wants_deepspeed() and not is_deepspeed(accelerator):
        raise ConfigError(
            f"the accelerate config asks for DeepSpeed but the run came up as {accelerator.distributed_type.value} "
            "(ACCELERATE_USE_CPU=true turns DeepSpeed off); unset ACCELERATE_USE_CPU for the cpu_zero*.yaml configs")
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "FSDP is not supported: adapter checkpoints are gathered and saved for DDP and DeepSpeed only; use "
            "accelerate_configs/zero3.yaml (parameters sharded like FSDP's FULL_SHARD)")
    if accelerator.gradient_accumulation_steps != cfg.grad_accum_steps:
        raise ConfigError(
            f"--grad-accum-steps is {cfg.grad_accum_steps} but Accelerate was configured with "
            f"{accelerator.gradient_accumulation_steps} (gradient_accumulation_steps in the accelerate config); "
            "remove it from the config file: the training config sets it")
    if is_deepspeed(accelerator):
        _check_deepspeed_config(cfg, accelerator)
    if cfg.policy.compile and is_deepspeed(accelerator):
        raise ConfigError("--policy.compile is not supported under DeepSpeed: its engine wraps the model after it is "
                          "compiled; drop the flag, or use DDP (accelerate_configs/ddp.yaml)")
    if cfg.nonfinite == "skip" and is_deepspeed(accelerator):
        raise ConfigError("--nonfinite skip is not supported under DeepSpeed: its engine applies the update inside "
                          "backward(), before the gradient norm can be checked; use --nonfinite stop")
    zero_stage = None
    if is_deepspeed(accelerator):
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    check_quantized_topology(cfg.quant, cfg.policy.dtype, accelerator.distributed_type.value, zero_stage)


def _check_deepspeed_config(cfg: TrainConfig, accelerator: Accelerator) -> None:
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    for section, what in (("optimizer", "train.py builds AdamW from --optim.*"),
                          ("scheduler", "train.py steps LeRobot's cosine schedule from --optim.*")):
        if section in ds:
            raise ConfigError(f"the DeepSpeed config has an '{section}' section, but {what}; remove the section")
    ours = {"train_micro_batch_size_per_gpu": (cfg.batch_size, "--batch-size"),
            "gradient_accumulation_steps": (cfg.grad_accum_steps, "--grad-accum-steps"),
            "gradient_clipping": (cfg.optim.grad_clip_norm, "--optim.grad-clip-norm")}
    for key, (value, flag) in ours.items():
        theirs = ds.get(key, "auto")
        if theirs != "auto" and float(theirs) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}={theirs} but {flag} is {value}; set it to 'auto' "
                              "(or leave it out) so the training config decides")
    if plugin.zero3_init_flag:
        raise ConfigError("zero3_init_flag: true is not supported: the policy is built whole from its folder and "
                          "sharded by accelerator.prepare(); set zero3_init_flag: false in the accelerate config")
    if ds.get("fp16", {}).get("enabled") in (True, "auto"):
        raise ConfigError("fp16 under DeepSpeed is not supported: its fp16 mode casts the trained parameters to fp16 "
                          "too. Use mixed_precision: bf16 (torch autocast, trained parameters fp32), or fp16 with "
                          "DDP (accelerate_configs/ddp.yaml)")


def fill_deepspeed_config(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Write the training config's micro-batch, accumulation and clipping into DeepSpeed's config (before prepare).

    The data loader is not prepared (the sampler shards by rank itself), so Accelerate cannot infer the batch size.
    """
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum_steps
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    ds["gradient_clipping"] = cfg.optim.grad_clip_norm
    if accelerator.device.type == "cpu":  # CPU ranks: nothing to offload from, so keep torch's AdamW under
        ds["zero_force_ds_cpu_optimizer"] = False  # an offload config rather than building DeepSpeed's CPUAdam
    if ds.get("bf16", {}).get("enabled") in (True, "auto"):
        # DeepSpeed's bf16 mode casts the whole model, the trained parameters too; torch autocast keeps the trained
        # parameters (and their optimizer state) fp32 and the base in --policy.dtype, as under DDP.
        ds["bf16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def autocast(accelerator: Accelerator) -> contextlib.AbstractContextManager:
    """The autocast the run trains with, for forward passes outside the engine (evaluation): Accelerate's, or under
    DeepSpeed the torch autocast that its engine applies in forward()."""
    if is_deepspeed(accelerator):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds.get("torch_autocast", {}).get("enabled"):
            return torch.autocast(accelerator.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
    return accelerator.autocast()


def save_state_kwargs(accelerator: Accelerator) -> dict[str, Any]:
    """Under DeepSpeed save_state is engine.save_checkpoint: keep the frozen base out of it."""
    return {"exclude_frozen_parameters": True} if is_deepspeed(accelerator) else {}


def load_state_kwargs(accelerator: Accelerator) -> dict[str, Any]:
    """The DeepSpeed checkpoint holds only the trained tensors: load the module non-strictly (the base comes from the
    policy folder, the adapter from adapter_model.safetensors)."""
    return {"load_module_strict": False} if is_deepspeed(accelerator) else {}


@contextlib.contextmanager
def gathered(accelerator: Accelerator, params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Inside, every rank sees the full tensors of `params` (ZeRO-3 shards them); enter it on every rank."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def build_models_whole(accelerator: Accelerator) -> None:
    """Keep transformers from sharding models as they are built. Under ZeRO-3 Accelerate registers its DeepSpeed config
    with transformers, which then builds every model made from a config inside deepspeed.zero.Init: sharded at once
    (a collective, so a model built on the main process only deadlocks) and with non-persistent buffers left on the
    meta device. Policies load their weights after building; accelerator.prepare() shards them afterwards."""
    if zero_stage(accelerator) == 3:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flow_noise(seed: int, micro_batch: int, batch_size: int, accelerator: Accelerator, chunk_size: int,
               action_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching noise (B, chunk, dim) and time (B,) for this rank's slice of global micro-batch `micro_batch`.

    Drawn for the whole global micro-batch from a generator seeded by its index, then sliced as the sampler slices
    the data, so sample j of the global batch gets the same noise with 1 or N processes and after a resume.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    generator = torch.Generator().manual_seed((seed * 1_000_003 + micro_batch) % (2**63))
    noise = torch.randn(world * batch_size, chunk_size, action_dim, generator=generator)
    time = sample_flow_time(world * batch_size, torch.device("cpu"), generator)
    rows = slice(rank * batch_size, (rank + 1) * batch_size)
    return noise[rows].to(accelerator.device), time[rows].to(accelerator.device)


def global_mean_weight(accelerator: Accelerator, valid: torch.Tensor) -> torch.Tensor:
    """Factor for this rank's masked-mean loss so that the mean over ranks (DDP's and DeepSpeed's gradient average)
    is the masked mean over the global micro-batch: valid_r * W / sum_r(valid_r). 1 on one process."""
    if accelerator.num_processes == 1:
        return torch.ones((), device=valid.device)
    local = valid.detach().float().reshape(())
    total = accelerator.reduce(local.clone(), reduction="sum")
    return local * accelerator.num_processes / total.clamp_min(1)


def eval_rows(batch_len: int, accelerator: Accelerator) -> tuple[list[int], float]:
    """This rank's rows of an evaluation batch and their weight. A rank left without rows evaluates row 0 with
    weight 0: under ZeRO-3 every rank must run the same forward passes."""
    rows = list(range(accelerator.process_index, batch_len, accelerator.num_processes))
    return (rows, 1.0) if rows else ([0], 0.0)


def dump_rank_view(accelerator: Accelerator, model: nn.Module, folder: Path, step: int) -> None:
    """The debug hook behind FINETUNE_DEBUG_RANK_DUMP: this rank's gathered trained tensors (PEFT's keys, as in
    adapter_model.safetensors) and the world it ran in."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unwrapped = accelerator.unwrap_model(model)
    with gathered(accelerator, trainable_parameters(unwrapped)):
        if isinstance(unwrapped, PeftModel):
            tensors = get_peft_model_state_dict(unwrapped)
        else:
            tensors = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    rank = accelerator.process_index
    save_file(tensors, str(folder / f"rank{rank}.safetensors"))
    info = {"rank": rank, "step": step, **describe(accelerator)}
    (folder / f"rank{rank}.json").write_text(json.dumps(info, indent=2) + "\n")


def check_shared_output_dir(accelerator: Accelerator, output_dir: Path) -> None:
    """Multi-node runs need an --output-dir every node sees (each rank writes its part of the training state, and a
    resume on any node reads all of them): rank 0 writes a token there and every rank must read it back. Checked at
    start on every multi-process run; all ranks raise together."""
    import socket
    import uuid

    from accelerate.utils import broadcast_object_list, gather_object

    if accelerator.num_processes == 1:
        return
    token = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(token, from_process=0)
    probe = output_dir / f".shared-check-{token[0]}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    accelerator.wait_for_everyone()
    try:
        sees = probe.read_text() == token[0]
    except OSError:
        sees = False
    views = gather_object([(accelerator.process_index, socket.gethostname(), sees)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, host, ok in views if not ok]
    if blind:
        raise ConfigError(
            f"--output-dir {output_dir} is not shared by all processes: {', '.join(blind)} cannot see what rank 0 "
            "writes there. Multi-node runs need an --output-dir on a filesystem every node mounts at the same path "
            "(NFS, Lustre, ...): each rank writes its part of the training state and a resume reads them all")


def world_of(accelerator: Accelerator) -> dict[str, Any]:
    """What a resumed run must match or convert: process count, and DDP vs DeepSpeed (with its ZeRO stage)."""
    return {"world_size": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
            "zero_stage": zero_stage(accelerator)}


def accelerate_config_text(accelerator: Accelerator) -> str:
    """The accelerate config the run was launched with (or what Accelerate resolved), and how it actually ran."""
    path = os.environ.get("ACCELERATE_CONFIG_FILE_USED") or os.environ.get("ACCELERATE_CONFIG_FILE")
    ran = "".join(f"#   {k}: {v}\n" for k, v in describe(accelerator).items())
    if path and Path(path).is_file():
        return f"# from {path}\n" + Path(path).read_text().rstrip("\n") + "\n# as run:\n" + ran
    state = accelerator.state
    return (f"# resolved at run time (no config file was passed)\ndistributed_type: {state.distributed_type.value}\n"
            f"num_processes: {state.num_processes}\nmixed_precision: {state.mixed_precision}\n# as run:\n" + ran)
