"""Fine-tune a VLA policy with PEFT adapters: `accelerate launch finetune/train.py <preset> [--flags]`.

Top to bottom: config (`finetune.config`) -> `setup()`, one builder per concern (data, policy + adapter, optimizer;
`finetune.training`) and the resumed state -> `fit()`: accumulate -> autocast -> backward -> clip and step only when
gradients sync, evaluating and saving on schedule -> `report()`. `run()` wraps that in the checks, the output-folder
and resume policy and the optional push; `main()` is the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `finetune` importable and keep finetune/ off the path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import SafetensorError
from torch import nn

from finetune import _quiet  # noqa: F401 - first: silences notices raised while peft imports bitsandbytes
from finetune.adapters import base_policy, count_parameters
from finetune.config import RESUME_AUTO, ConfigError, TrainConfig, cli, flat_fields, to_dict, validate
from finetune.data import DatasetError, workers
from finetune.data.transforms import ImageTransforms
from finetune.hub import check_can_push, resolve_repo
from finetune.logs import LogFile, info_enabled, setup_logging
from finetune.policies import save_policy
from finetune.policies.base import ACTION, ACTION_IS_PAD, OBS_STATE
from finetune.policies.lerobot_processor import lerobot_tokenizer_name, write_processor_files
from finetune.policies.processor import PolicyProcessor, image_keys, images_to_float, save_stats
from finetune.training import checkpoint as ckpt
from finetune.training import distributed as dist
from finetune.training import state as training_state
from finetune.training.checkpoint import CheckpointWriteError
from finetune.training.cpu_memory import keep_freed_memory
from finetune.training.data import TrainData, build_data, build_processor, load_data_mix
from finetune.training.distributed import make_accelerator
from finetune.training.ema import EMA
from finetune.training.evaluation import heldout_mse, to_device
from finetune.training.metrics import MetricsLogger, check_trackers, read_metrics
from finetune.training.model import attention_kernels, build_model, load_base_policy, make_ema
from finetune.training.optim import build_optimizer
from finetune.training.preemption import STOP, Preempted, StopRequest, report_preempted, report_status
from finetune.training.preflight import check_dataset_stats, check_policy_folder, earlier_checkpoint_fix
from finetune.training.progress import Progress
from finetune.training.run_dir import check_resume, claim_output_dir, hold_output_dir, resolve_resume
from finetune.training.threads import apply_cpu_threads

EXIT_NONFINITE = 3  # training diverged (NaN/inf); exit 2 is a bad input, 75 a preemption
log = logging.getLogger("finetune.train")  # not __name__: "__main__" when run as a script


@dataclass
class Run:
    """Everything the loop touches, built by setup()."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    processor: PolicyProcessor
    data: TrainData
    policy_dir: Path
    step: int = 0
    samples_seen: int = 0
    micro_batches: int = 0  # global micro-batches trained on (seeds each one's flow-matching noise)
    resumed_step: int | None = None  # the checkpoint's step when resuming
    skipped_updates: int = 0  # updates skipped for a non-finite loss/gradient (--nonfinite skip)
    ema: EMA | None = None  # moving average of the trained weights (--ema.decay)
    image_transforms: ImageTransforms | None = None  # training-image augmentation, None when off
    sim: Any = None  # --env.type: finetune.envs.during_training.SimEvaluation
    eval_by_dataset: dict[str, float] = field(default_factory=dict)  # the last evaluation per dataset, to log
    summary: dict[str, Any] = field(default_factory=dict)


# --- setup: one builder per concern -----------------------------------------------------------------------------------


def setup(cfg: TrainConfig, accelerator: Accelerator, sim: Any = None) -> Run:
    set_seed(cfg.seed)
    policy_dir = resolve_repo(cfg.policy.path, "model", "--policy.path")
    check_policy_folder(cfg, policy_dir, cfg.batch_size)  # a readable, known policy before anything reads it
    cfg, mix = load_data_mix(cfg)
    check_dataset_stats(cfg, policy_dir, mix.sources)  # missing stats stop now, before any model is built
    policy = load_base_policy(cfg, policy_dir, mix.merged_meta(), attention_kernels(cfg, accelerator))
    threads = apply_cpu_threads(cfg.cpu_threads, sum(p.numel() for p in policy.parameters()),
                                accelerator.device.type == "cpu")  # before the linears are timed (cpu-linear auto)
    if accelerator.device.type == "cpu" and keep_freed_memory():
        log.debug("malloc keeps freed memory for reuse (no page faults on each step's big activations)")
    processor = build_processor(cfg, policy, policy_dir, mix)
    resume_from = ckpt.resolve_last(cfg.checkpoints_dir) if cfg.resume else None
    model = build_model(cfg, policy, accelerator, resume_from)
    data = build_data(cfg, mix, processor, policy.config.chunk_size, accelerator)
    optimizer, scheduler = build_optimizer(cfg, (p for p in model.parameters() if p.requires_grad))
    trainable, total = count_parameters(model)  # before prepare: ZeRO-3 leaves each rank a shard
    dist.fill_deepspeed_config(cfg, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per update, saved with the state

    run = Run(cfg, accelerator, model, optimizer, scheduler, processor, data, policy_dir, sim=sim)
    run.ema = make_ema(cfg, accelerator, model)
    if cfg.dataset.image_transforms.enable:
        try:
            run.image_transforms = ImageTransforms(cfg.dataset.image_transforms, cfg.seed)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if resume_from is not None:
        restore(run, resume_from)
    run.summary.update(trainable_params=trainable, total_params=total, data_workers=data.workers,
                       decoder_threads=data.decoder_threads, cpu_threads=threads and threads[0],
                       video_cache_mb_per_process=data.cache_bytes >> 20)
    log.info(f"parameters: trainable {trainable:,} / total {total:,} ({100 * trainable / total:.2f}%)")
    if threads is not None:
        log.info(f"cpu threads: {threads[0]} ({threads[1]}); data-loader workers: {data.workers}")
    return run


def restore(run: Run, checkpoint: Path) -> None:
    """Optimizer, scheduler and RNG states, the step and data position, and the EMA, from `checkpoint` (its adapter
    is already attached by build_model)."""
    folder, accelerator = checkpoint / ckpt.TRAINING_STATE_DIR, run.accelerator
    try:
        if dist.is_deepspeed(accelerator) or not training_state.has_safe_state(folder):
            check_pickles(folder, run.cfg.checkpoint.trust_pickles)
            accelerator.load_state(str(folder), **dist.load_state_kwargs(accelerator))
        else:
            training_state.load_optimizer(folder, run.optimizer)
            training_state.load_scheduler(folder, run.scheduler)
            training_state.load_rng(folder, accelerator.process_index)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, SafetensorError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{checkpoint / ckpt.TRAINING_STATE_DIR}: the optimizer/scheduler state cannot be loaded "
                          f"({type(err).__name__}: {str(err)[:200]}); {earlier_checkpoint_fix(checkpoint)}") from None
    state = ckpt.load_trainer_state(checkpoint)
    run.step, run.samples_seen = state["step"], state["samples_seen"]
    run.micro_batches = state["batches_seen"]
    run.resumed_step = run.step
    run.data.sampler.set_position(state["batches_seen"])
    if run.ema is not None and not run.ema.load(checkpoint):
        log.warning(f"{checkpoint} has no EMA weights: the average starts from the resumed weights")
    log.info(f"resumed from {checkpoint} at step {run.step}")


def check_pickles(folder: Path, trusted: bool) -> None:
    """A training state in pickles (DeepSpeed's, or this project's before finetune.training.state) is loaded in full
    only when every file reads as plain tensors, or when the user vouches for where the checkpoint came from."""
    unsafe = training_state.unsafe_files(folder)
    if unsafe and not trusted:
        raise ConfigError(f"{folder}: {', '.join(unsafe[:4])} hold Python objects that loading would unpickle, which "
                          "can run code from the checkpoint. Resume it only if you trust where it came from: "
                          "pass --checkpoint.trust-pickles (or start a new --output-dir)")


# --- one optimizer update ---------------------------------------------------------------------------------------------


def device_batch(run: Run, batch: dict[str, Any]) -> dict[str, Any]:
    """A loader batch on the training device: uint8 images become float there, then are augmented when enabled
    (seeded by the global micro-batch index, like the flow-matching noise, so --resume stays exact)."""
    batch = images_to_float(to_device(batch, run.accelerator.device))
    if run.image_transforms is not None:
        run.image_transforms(batch, image_keys(batch), run.micro_batches, run.accelerator.process_index,
                             run.accelerator.num_processes)
    return batch


class NonFiniteError(RuntimeError):
    """A NaN/inf gradient norm at optimizer update `step` (under DeepSpeed the engine has already applied it)."""

    def __init__(self, step: int, grad_norm: float, loss: float, applied: bool = False):
        super().__init__(f"step {step}: non-finite training (loss {loss}, gradient norm {grad_norm})")
        self.step, self.grad_norm, self.loss, self.applied = step, grad_norm, loss, applied
        self.kept: str | None = None  # the last good checkpoint, filled in by fit()


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
                deepspeed = dist.is_deepspeed(accelerator)
                if run.cfg.nonfinite == "stop" or deepspeed:
                    raise NonFiniteError(run.step + 1, grad_norm, float(loss.detach()), applied=deepspeed)
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


# --- evaluation and checkpoints ---------------------------------------------------------------------------------------


def evaluate(run: Run, seed: int = 0) -> float | None:
    """Held-out action MSE with the EMA weights when there are (and --ema.use-for-eval), else the trained ones;
    on the main process (None elsewhere)."""
    ema = run.ema if run.cfg.ema.use_for_eval else None
    mse, run.eval_by_dataset = heldout_mse(run.model, run.accelerator, run.data.eval_batches, run.data.eval_sources,
                                           ema, seed)
    return mse


def save(run: Run) -> Path:
    cfg, accelerator = run.cfg, run.accelerator
    policy = base_policy(accelerator.unwrap_model(run.model))
    adapter = base_policy(accelerator.unwrap_model(run.model)) is not accelerator.unwrap_model(run.model)
    files = {
        "config.json": {**policy.config.to_dict(), **({"use_peft": True} if adapter else {})},  # LeRobot's flag
        "train_config.json": to_dict(cfg),
        "accelerate_config.yaml": dist.accelerate_config_text(accelerator),
    }

    def write_model_files(folder: Path) -> None:
        ckpt.write_trained_weights(accelerator.unwrap_model(run.model), folder, save_policy)
        if run.ema is not None:  # ema_state.safetensors (resume) and ema/ (the averaged adapter)
            run.ema.save(folder, lambda f: ckpt.write_trained_weights(accelerator.unwrap_model(run.model), f,
                                                                      save_policy))
        save_stats(run.processor.normalizer.stats, folder)
        write_processor_files(folder, policy.config, run.processor.normalizer.stats, rename_map=cfg.dataset.rename_map,
                              tokenizer_name=lerobot_tokenizer_name(policy.config, run.policy_dir))
        ckpt.write_lerobot_adapter_files(folder, ckpt.base_model_name(cfg.policy.path, run.policy_dir))

    def write_state(folder: Path) -> None:  # every rank
        if dist.is_deepspeed(accelerator):  # its ZeRO-sharded optimizer: DeepSpeed's own format
            accelerator.save_state(str(folder), **dist.save_state_kwargs(accelerator))
            return
        folder.mkdir(parents=True, exist_ok=True)
        if accelerator.is_main_process:  # DDP: every rank holds the same optimizer
            training_state.save_optimizer(folder, run.optimizer)
            training_state.save_scheduler(folder, run.scheduler)
        training_state.save_rng(folder, accelerator.process_index)

    state = {"step": run.step, "samples_seen": run.samples_seen, "batches_seen": run.step * cfg.grad_accum_steps,
             **dist.world_of(accelerator)}
    return ckpt.save_checkpoint(accelerator, run.model, run.step, cfg.checkpoints_dir, files, write_model_files,
                                cfg.checkpoint.keep_last, state, write_state)


def evaluate_in_sim(run: Run, logger: MetricsLogger) -> None:
    """--env.type: closed-loop success on the main process when due; every rank waits for it."""
    if run.sim is None:
        return
    if run.accelerator.is_main_process:
        metrics = run.sim.run(run.step, run.accelerator.unwrap_model(run.model), run.processor,
                              run.accelerator.device, lambda: dist.autocast(run.accelerator))
        if metrics:
            logger.log(run.step, metrics)
            run.summary["sim_success_rate"] = metrics["sim/success_rate"]
    if run.sim.due(run.step):
        run.accelerator.wait_for_everyone()


# --- the loop ---------------------------------------------------------------------------------------------------------


def fit(run: Run) -> dict[str, Any]:
    cfg, accelerator = run.cfg, run.accelerator
    output_dir = Path(cfg.output_dir)
    logger = MetricsLogger(output_dir, enabled=accelerator.is_main_process, resume_step=run.resumed_step,
                           trackers=cfg.log_with, config=flat_fields(cfg))
    if accelerator.is_main_process:
        (output_dir / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    stop = STOP.install()
    bar = Progress(cfg.steps, run.step, enabled=accelerator.is_main_process and info_enabled(),
                   every_s=cfg.progress_every_s)
    try:
        if run.resumed_step is None:
            mse = evaluate(run)
            if mse is not None:
                run.summary.setdefault("eval_mse_before", mse)
                logger.log(run.step, {"eval/action_mse": mse, **run.eval_by_dataset})
                log.info(f"step {run.step}: held-out action MSE {mse:.4f}")
        elif accelerator.is_main_process:  # the figure before training, as the first attempt logged it
            before = [m["eval/action_mse"] for m in read_metrics(output_dir / "metrics.jsonl")
                      if m.get("step") == 0 and "eval/action_mse" in m]
            if before:
                run.summary["eval_mse_before"] = before[0]
        train_loop(run, logger, bar, stop)
    except NonFiniteError as err:
        last = cfg.checkpoints_dir / ckpt.LAST
        err.kept = run.summary.get("checkpoint") or (str(last.resolve()) if last.exists() else None)
        raise
    finally:
        bar.close()
        logger.close()
    if os.environ.get(dist.DEBUG_DUMP_ENV):
        dist.dump_rank_view(accelerator, run.model, output_dir / "debug", run.step)
    return run.summary


def train_loop(run: Run, logger: MetricsLogger, bar: Progress, stop: StopRequest) -> None:
    cfg, accelerator = run.cfg, run.accelerator
    batch_iter = iter(run.data.loader)
    global_batch = cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    tick, tick_step = time.perf_counter(), run.step
    run.model.train()
    while run.step < cfg.steps:
        losses = []
        for _ in range(cfg.grad_accum_steps):
            loss, grad_norm = train_step(run, device_batch(run, next(batch_iter)))
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
            bar.update(run.step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{throughput:.1f}")
        else:
            bar.update(run.step)
        if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
            mse = evaluate(run)
            if mse is not None:
                logger.log(run.step, {"eval/action_mse": mse, **run.eval_by_dataset})
                run.summary["eval_mse_after"] = mse
                bar.write(f"step {run.step}: held-out action MSE {mse:.4f}")
        saved = run.step % cfg.checkpoint.every == 0 or run.step == cfg.steps
        if saved:
            run.summary["checkpoint"] = str(save(run))
        evaluate_in_sim(run, logger)
        signal_name = stop.agreed(accelerator)  # every rank, every update: all stop at the same step
        if signal_name is not None and run.step < cfg.steps:
            path = Path(run.summary["checkpoint"]) if saved else save(run)
            raise Preempted(run.step, path, signal_name)
    if run.skipped_updates:
        run.summary["skipped_updates"] = run.skipped_updates


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
                     f"({change_ratio(s['eval_mse_before'], s['eval_mse_after'])})")
    if s.get("skipped_updates"):
        lines.append(f"skipped updates (non-finite loss/gradient): {s['skipped_updates']}")
    log.info("\n".join(lines))
    s.update(trained_bytes=trained, base_bytes=base)


def change_ratio(before: float, after: float) -> str:
    """`4.2x lower`, `1.0% higher` or `unchanged`, as the figure moved (an error that rose must not read as lower)."""
    if after == before:
        return "unchanged"
    word = "lower" if after < before else "higher"
    ratio = max(before, after) / max(min(before, after), 1e-12)
    return f"{abs(after - before) / max(before, 1e-12):.1%} {word}" if ratio < 1.1 else f"{ratio:.1f}x {word}"


def run_training(cfg: TrainConfig, accelerator: Accelerator, sim: Any = None) -> dict[str, Any]:
    """setup -> fit -> report for a config whose output folder and resume are settled (see run())."""
    threads = torch.get_num_threads()  # --cpu-threads is this run's: a caller in the same process keeps its own
    try:
        run = setup(cfg, accelerator, sim)
        try:
            summary = fit(run)
            report(run)
        finally:
            workers.stop_workers(run.data.loader)  # now, not at the interpreter's exit (they ignore SIGTERM)
            accelerator.free_memory()
            accelerator._custom_objects.clear()  # the next run in this process registers its own scheduler
    finally:
        torch.set_num_threads(threads)
    return summary


# --- the command ------------------------------------------------------------------------------------------------------


def make_sim_evaluation(cfg: TrainConfig, accelerator: Accelerator) -> Any:
    """--env.type: the simulator hook, checked now and imported only when asked for (training needs no simulator)."""
    if cfg.env.type is None:
        return None
    from finetune.envs.during_training import SimEvaluation

    return SimEvaluation(cfg, sharded=dist.zero_stage(accelerator) == 3)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """The whole command for a parsed config: checks, the output folder and resume policy, training, and the push
    when asked. Raises the project's errors; main() turns them into one line and an exit status."""
    STOP.install()  # from the start: a preemption during setup stops the run after its first update
    setup_logging(cfg.log_level)
    lock = log_file = None
    try:
        validate(cfg)
        check_trackers(cfg.log_with)
        check_can_push(cfg.push_repo_ids, "--policy.repo-id")  # offline or logged out: fail now, not after training
        accelerator = make_accelerator(cfg)
        dist.check_distributed_support(cfg, accelerator)
        sim = make_sim_evaluation(cfg, accelerator)
        lock = hold_output_dir(cfg, accelerator)  # before anything is written there; held until this run ends
        auto = cfg.resume == RESUME_AUTO
        cfg = resolve_resume(cfg, accelerator)
        if not cfg.resume:
            claim_output_dir(cfg, accelerator, auto)
        dist.check_shared_output_dir(accelerator, Path(cfg.output_dir))
        log_file = LogFile(Path(cfg.output_dir), enabled=accelerator.is_main_process)
        if cfg.resume:
            state = check_resume(cfg, accelerator)
            if state["step"] >= cfg.steps:
                log.info(f"{state['checkpoint']} already reached step {state['step']} (--steps {cfg.steps}): "
                         "nothing to train. Pass a larger --steps to continue.")
                return {"checkpoint": state["checkpoint"], "step": state["step"], "finished": True}
        summary = run_training(cfg, accelerator, sim)
        if cfg.push_repo_ids and accelerator.is_main_process:
            from finetune.export.publish import push_run  # export code, loaded only when a push is asked

            push_run(cfg, summary)
        return summary
    except BaseException as err:
        if log_file is not None:
            log_file.record_failure(err)
        raise
    finally:
        if log_file is not None:
            log_file.close()
        if lock is not None:
            lock.release()
        STOP.uninstall()


def _is_rank(variable: str) -> bool:
    return int(os.environ.get(variable, "0")) == 0


@contextlib.contextmanager
def exit_codes() -> Iterator[None]:
    """The project's errors as one line and an exit status: 2 a bad input, 3 diverged training, 75 preempted."""
    try:
        yield
    except (ConfigError, DatasetError, FileNotFoundError, CheckpointWriteError) as err:
        if _is_rank("LOCAL_RANK"):  # once in each node's log
            print(f"error: {err}", file=sys.stderr, flush=True)
        alone = int(os.environ.get("WORLD_SIZE", "1")) == 1  # with several ranks, not every error is every rank's
        raise SystemExit(report_status(2, every_rank=alone)) from None
    except Preempted as stopped:
        if _is_rank("RANK"):
            what = "interrupted" if stopped.signal_name == "SIGINT" else "preempted"
            print(f"{what}: {stopped}; continue with --resume auto", file=sys.stderr, flush=True)
        raise SystemExit(report_preempted(stopped.signal_name)) from None
    except NonFiniteError as err:
        applied = "DeepSpeed had applied the update; the run stopped before saving it" if err.applied else \
            "the update was not applied"
        if _is_rank("RANK"):
            print(f"error: {err}; {applied}, and the last good checkpoint {err.kept or '(none yet)'} is kept. Lower "
                  "--optim.lr, check the data for NaN/inf, or pass --nonfinite skip to skip such updates",
                  file=sys.stderr, flush=True)
        raise SystemExit(report_status(EXIT_NONFINITE, every_rank=True)) from None  # all ranks see the same norm


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        cfg = cli(argv, console_outputs=_is_rank("RANK"))
    except SystemExit as parse_error:  # a bad flag: tyro printed why, every rank alike
        raise SystemExit(report_status(2, every_rank=True) if parse_error.code == 2 else parse_error.code) from None
    with exit_codes():
        return run(cfg)


def cli_main() -> None:
    """Console-script entry (finetune-train): exit status 0 on success."""
    main()


if __name__ == "__main__":
    cli_main()
