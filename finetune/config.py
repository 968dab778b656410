"""Typed run configuration, named presets and the command line.

`accelerate launch finetune/train.py <preset> [--flags]`: the preset gives every default, flags override any field
(nested fields are dotted: `--policy.path`, `--peft.r`, `--dataset.root`). Topology, ZeRO stage and mixed precision
live in `accelerate_configs/*.yaml`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

PEFT_METHOD_FULL = "FULL"  # no adapter: every parameter trains (used by the demo's base pretraining)
RESUME_AUTO = "auto"


def _parse_resume(values: list[str]) -> bool | str:
    if not values:
        return True
    if len(values) == 1 and values[0].lower() in (RESUME_AUTO, "true", "false"):
        word = values[0].lower()
        return word if word == RESUME_AUTO else word == "true"
    raise ValueError(f"--resume takes no value or 'auto', got {' '.join(values)!r}")


# `--resume` alone keeps its strict meaning (a checkpoint must exist); `--resume auto` resumes when one does.
_RESUME_FLAG = tyro.constructors.PrimitiveConstructorSpec(
    nargs="*", metavar="[auto]", instance_from_str=_parse_resume,
    is_instance=lambda v: isinstance(v, bool) or v == RESUME_AUTO,
    str_from_instance=lambda v: [] if v is True else [str(v)])


@dataclass(frozen=True)
class PolicyOptions:
    path: str | None = None
    """Pretrained policy: a local LeRobot-format folder (config.json + model.safetensors) or a Hub id such as
    lerobot/smolvla_base. Hub ids are fetched through the Hugging Face cache when online."""
    tokenizer_path: str | None = None
    """Folder holding the tokenizer files (tokenizer.json, tokenizer_config.json). Default: the policy folder, then
    the VLM's Hub id (cached copy when offline)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the frozen base weights (trained parameters stay in float32)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass: less activation memory, about 30% more compute."""
    chunk_size: int | None = None
    """Override the policy's action chunk length (None keeps the checkpoint's value)."""
    num_steps: int | None = None
    """Override the number of denoising (Euler) steps used when sampling actions."""
    repo_id: str | None = None
    """Hub model repo (NAME or ORG/NAME) the last checkpoint and its model card are pushed to at the end (as
    LeRobot's --policy.repo_id). Needs network and a login, checked before training starts."""
    merged_repo_id: str | None = None
    """Also merge the adapter into the base at the end and push that full LeRobot-format policy to this repo."""
    use_relative_actions: bool = False
    """Train on actions minus the chunk's first state, as LeRobot's pi0 / pi0.5 (off keeps the checkpoint's setting);
    action stats are then computed on the relative actions and predictions are made absolute again."""
    relative_exclude_joints: tuple[str, ...] | None = None
    """Action joints kept absolute with relative actions, by name or part of a name (None: the checkpoint's value,
    LeRobot's default ["gripper"])."""
    attn_implementation: Literal["auto", "sdpa", "eager"] = "auto"
    """Attention kernel in the joint VLM/expert layers and the vision tower: torch's fused scaled_dot_product_attention
    (same loss as eager to float32 rounding) or LeRobot's eager float32-softmax path. auto: SDPA, except in the joint
    layers of a CPU run under bf16/fp16 autocast, where eager's backward is faster (the vision tower keeps SDPA).
    Not written to config.json."""
    cpu_linear: Literal["auto", "onednn", "aten"] = "auto"
    """Kernel of float32 linear layers on CPU: auto measures oneDNN's GEMM and torch's (MKL) on the model's own layer
    shapes at start and keeps the faster per shape (cached per CPU model, torch version and threads in
    ~/.cache/finetune/cpu_linear.json); onednn or aten force one. Same float32 math either way. CUDA, bf16 and
    autocast always use torch's. Not under ZeRO-3."""
    compile: bool = False
    """torch.compile the policy's forward and sampling (inductor) for this run, as LeRobot's compile_model (a
    config.json that sets compile_model compiles too; this flag is not written to it). On the 2-core Intel Xeon the
    real-size SmolVLA LoRA step took 0.87x / 0.93x of the eager one at batch 2 / 8 (float32), after an 80-116 s compile
    on the first step; each new batch shape or train/eval switch compiles again, so it pays on long runs only. Not
    under DeepSpeed."""


@dataclass(frozen=True)
class PeftOptions:
    method: str = "LORA"
    """PEFT method by name: LORA, LOHA, LOKR, IA3, VERA, OFT, BOFT, ... (any PEFT type that adapts linear layers),
    or FULL to train every parameter without an adapter."""
    r: int = 64
    """Adapter rank (for methods that have one)."""
    lora_alpha: int | None = None
    """Adapter scaling numerator; None uses r (scale 1)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input."""
    init_type: str | None = None
    """Adapter initialization passed to PEFT's init_lora_weights (e.g. gaussian, pissa, olora); None = default."""
    target_modules: tuple[str, ...] | None = None
    """Modules to adapt: module-name suffixes (q_proj v_proj), or one regex matched against full names.
    None uses the policy's defaults (LeRobot's)."""
    full_training_modules: tuple[str, ...] = ()
    """Modules trained in full beside the adapter (PEFT's modules_to_save), e.g. action_out_proj."""
    use_dora: bool = False
    """LORA: weight-decomposed LoRA (DoRA): a trained magnitude per output feature beside the low-rank direction."""
    use_rslora: bool = False
    """LORA: rank-stabilized scaling lora_alpha / sqrt(r) instead of lora_alpha / r."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks overriding --peft.r: module-name regex (or suffix) -> rank, e.g. `lm_expert.*q_proj 16`."""
    alpha_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module alphas overriding --peft.lora-alpha, keyed like --peft.rank-pattern."""
    init_from: str | None = None
    """Start from this trained adapter (folder or Hub id: a checkpoint of ours, or a LeRobot PEFT run's
    checkpoints/<step>/pretrained_model) instead of a fresh one: its method, targets and weights train on; the other
    --peft options do not apply. The base is --policy.path."""


@dataclass(frozen=True)
class QuantOptions:
    load_in_8bit: bool = False
    """Load the frozen base's linear layers in 8-bit (bitsandbytes LLM.int8): about half the bf16 bytes."""
    load_in_4bit: bool = False
    """Load them in 4-bit (QLoRA): about a quarter of the bf16 bytes."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """4-bit: quantize the quantization constants too (saves ~0.4 bit/parameter)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """4-bit: dtype the matmuls run in."""
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """4-bit: dtype the packed weights are stored in; must equal the model dtype under ZeRO-3/FSDP."""
    keep_vision: bool = False
    """Keep the vision tower in full precision instead of quantizing it."""
    int8_threshold: float = 6.0
    """8-bit: outlier threshold of LLM.int8 (features above it run in 16-bit)."""
    skip_modules: tuple[str, ...] = ()
    """More module names (suffixes) to keep in full precision."""

    @property
    def enabled(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit


@dataclass(frozen=True)
class ImageTransformOptions:
    """Image augmentation as LeRobot's (off by default): per camera image, up to max_num_transforms of the ops below
    (each with its weight), with factors drawn from the ranges; a range equal to the identity value disables an op."""

    enable: bool = False
    """Augment training images (on the training device, seeded by --seed and the micro-batch: --resume stays exact)."""
    max_num_transforms: int = 3
    """Ops applied to each image, picked at random (weighted) from the enabled ones."""
    brightness: tuple[float, float] = (0.8, 1.2)
    """Brightness factor range (1 = unchanged)."""
    contrast: tuple[float, float] = (0.8, 1.2)
    """Contrast factor range (1 = unchanged)."""
    saturation: tuple[float, float] = (0.5, 1.5)
    """Saturation factor range (1 = unchanged)."""
    hue: tuple[float, float] = (-0.05, 0.05)
    """Hue shift range, in turns of the color wheel (0 = unchanged, at most 0.5)."""
    sharpness: tuple[float, float] = (0.5, 1.5)
    """Sharpness factor range (1 = unchanged, < 1 blurs)."""
    affine_degrees: float = 5.0
    """Random affine: rotation drawn from [-degrees, degrees] (0 with affine_translate 0 disables it)."""
    affine_translate: float = 0.05
    """Random affine: shift drawn from [-t, t] of the width and of the height."""
    weights: tuple[float, float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    """Relative chance of brightness, contrast, saturation, hue, sharpness, affine being picked."""


@dataclass(frozen=True)
class DataOptions:
    root: tuple[str, ...] | None = None
    """Local LeRobotDataset v3.0 folder (meta/info.json, data/, videos/); several (or Hub ids ORG/NAME) train on one
    weighted mixture of them (see --dataset.weights, --dataset.renames). A v2.1 / v2.0 folder is converted to v3.0
    once, into <folder>_v30 beside it (see finetune-convert)."""
    repo_id: str | None = None
    """Hub dataset id, fetched through the Hugging Face cache when online (ignored when root is given)."""
    rename_map: dict[str, str] = field(default_factory=dict)
    """Dataset feature name -> policy input name, e.g. observation.images.front:observation.images.top"""
    eval_episodes: int = 2
    """Number of episodes (the last ones) held out for evaluation; 0 disables evaluation."""
    num_workers: int | None = None
    """DataLoader worker processes per rank; None: from the CPU count and the ranks on this machine (cores per rank
    less one, at most 8); 0 decodes in the training process."""
    video_cache_mb: int | None = None
    """Decoded-frame cache for the whole node, in MiB, split evenly across ranks x workers (frames are kept singly,
    LRU; 0 disables it); None: 1/32 of the node's memory, at most 4 GiB."""
    decoder_threads: int | None = None
    """Video decoder threads per loading process; None: what the cores left by ranks x workers allow (1-2)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    tolerance_s: float = 1e-4
    """Seconds a frame's parquet timestamp may be off the 1/fps grid, and off its video frame (LeRobot's tolerance_s);
    checked at load. Raise it for a dataset recorded with a jittery clock."""
    image_transforms: ImageTransformOptions = ImageTransformOptions()
    weights: tuple[float, ...] | None = None
    """Sampling weight per --dataset.root entry (normalized); None: proportional to each dataset's frames."""
    renames: tuple[str, ...] | None = None
    """Per --dataset.root entry, its rename map as FEATURE:NAME pairs joined by commas ("-" for none), applied before
    --dataset.rename-map so cameras and state line up (observation.images.front:observation.images.top)."""
    episodes: tuple[str, ...] | None = None
    """Train on these episodes only: indices and inclusive ranges (0-9 12 20-29); held-out episodes are the last
    --dataset.eval-episodes of the selection. With several datasets prefix each with its dataset's position (1:0-9)."""

    @property
    def roots(self) -> tuple[str, ...]:
        """--dataset.root as a tuple (a single folder may be given as a plain string)."""
        if self.root is None:
            return ()
        return (self.root,) if isinstance(self.root, str) else tuple(self.root)


@dataclass(frozen=True)
class OptimOptions:
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-10
    grad_clip_norm: float = 10.0
    """Gradient-norm clip applied at each optimizer update; 0 disables."""
    warmup_steps: int = 1000
    """Linear warmup length in optimizer updates."""
    decay_steps: int | None = None
    """Cosine decay length in optimizer updates; None decays over the whole run."""
    decay_lr: float = 2.5e-6
    """Learning rate at the end of the cosine decay."""


@dataclass(frozen=True)
class CheckpointOptions:
    every: int = 1000
    """Save a checkpoint every N optimizer updates (and always at the end)."""
    keep_last: int = 3
    """How many checkpoints to keep; older ones are deleted."""
    trust_pickles: bool = False
    """--resume a checkpoint whose training state is pickled (DeepSpeed's, or one written before this project saved
    it as safetensors + JSON). Unpickling can run code from the checkpoint: only for checkpoints you trust."""


@dataclass(frozen=True)
class EnvOptions:
    type: str | None = None
    """Simulator for closed-loop evaluation of the policy being trained (LeRobot's --env.type): reach, metaworld or
    libero. None: no simulator evaluation."""
    task: str | None = None
    """Task, task list or suite (LeRobot's --env.task), e.g. libero_spatial, push-v3, 'push-v3,reach-v3', MT10."""
    episodes: int = 10
    """Seeded episodes per task at each evaluation (LeRobot's --eval.n_episodes)."""
    eval_every: int = 0
    """Also evaluate every N optimizer updates (LeRobot's --eval_freq); 0: only at the end of training."""
    max_steps: int | None = None
    """Episode length limit in environment steps (LeRobot's --env.episode_length); None: the task's default."""
    image_size: int | None = None
    """Rendered camera size in pixels; None: the training dataset's camera height."""
    assets_dir: str | None = None
    """LIBERO's scene assets folder (tools/libero_assets.py makes one); None: LIBERO's config.yaml entry, else
    hf-libero's own folder."""


@dataclass(frozen=True)
class EmaOptions:
    decay: float = 0.0
    """Keep an exponential moving average of the trained weights with this decay per optimizer update (e.g. 0.999);
    0 turns it off. Saved with each checkpoint (ema/), restored on --resume, used by merge/predict by default."""
    use_for_eval: bool = True
    """Compute the held-out action MSE with the EMA weights (when --ema.decay is set)."""


@dataclass(frozen=True)
class TrainConfig:
    policy: PolicyOptions = PolicyOptions()
    peft: PeftOptions = PeftOptions()
    quant: QuantOptions = QuantOptions()
    dataset: DataOptions = DataOptions()
    optim: OptimOptions = OptimOptions()
    checkpoint: CheckpointOptions = CheckpointOptions()
    env: EnvOptions = EnvOptions()
    ema: EmaOptions = EmaOptions()
    output_dir: str = "runs/train"
    """Run folder: checkpoints/, metrics.jsonl, tensorboard/, train_config.json."""
    steps: int = 30_000
    """Optimizer updates to run (each one is grad_accum_steps micro-batches)."""
    batch_size: int = 32
    """Micro-batch size per process."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer update."""
    seed: int = 1000
    resume: Annotated[bool | Literal["auto"], _RESUME_FLAG] = False
    """Continue the run in output_dir from checkpoints/last (same adapter, optimizer, scheduler, RNG, data order).
    `--resume auto`: continue when checkpoints/last exists, else start fresh (one command line for every requeue)."""
    wait_for_lock: float | None = None
    """Seconds to wait for another run holding --output-dir to finish (a run holds its folder while it runs); None:
    300 with --resume auto (a requeued job overlapping its predecessor), else 0 (refuse at once)."""
    overwrite: bool = False
    """Start a new run in an output_dir that already holds one: the old run is moved aside (renamed), never deleted."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient: stop the run naming the step (the last good checkpoint stays) or skip the update."""
    log_with: tuple[str, ...] = ("tensorboard",)
    """Experiment trackers through Accelerate: tensorboard, wandb, mlflow, comet_ml, aim, clearml, ... or none.
    metrics.jsonl is always written. wandb needs the package and a login (or WANDB_MODE=offline)."""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """Autocast precision; None: bf16/fp16 autocast for a bf16/fp16 --policy.dtype, else the accelerate config's."""
    log_every: int = 10
    """Write metrics every N optimizer updates."""
    progress_every_s: float = 30.0
    """When stderr is not a terminal (a cluster log, a file): one plain progress line every this many seconds instead
    of a progress bar."""
    cpu_threads: int | None = None
    """Intra-op threads of a training process on CPU; None: one for models under 50M parameters (their speed
    survives a shared CPU), else torch's count (OMP_NUM_THREADS, which accelerate launch sets). GPU runs: unaffected."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Messages shown (and written to <output_dir>/train.log) on the main rank; other ranks show warnings and errors
    only, prefixed with their rank. `warning` also hides the progress lines."""
    eval_every: int = 500
    """Held-out action MSE every N optimizer updates (and before the first and after the last)."""
    eval_batches: int = 4
    """Held-out batches per evaluation."""

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def push_repo_ids(self) -> list[str]:
        """The Hub repos pushed to at the end of the run (--policy.repo-id, --policy.merged-repo-id)."""
        return [r for r in (self.policy.repo_id, self.policy.merged_repo_id) if r]


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the field and the fix."""


def validate(cfg: TrainConfig) -> None:
    """Refuse bad values before any model is built."""
    from peft import PeftType

    checks = [
        (cfg.steps >= 1, f"--steps must be >= 1, got {cfg.steps}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.grad_accum_steps >= 1, f"--grad-accum-steps must be >= 1, got {cfg.grad_accum_steps}"),
        (cfg.optim.lr > 0, f"--optim.lr must be > 0, got {cfg.optim.lr}"),
        (cfg.optim.decay_lr >= 0, f"--optim.decay-lr must be >= 0, got {cfg.optim.decay_lr}"),
        (cfg.optim.warmup_steps >= 0, f"--optim.warmup-steps must be >= 0, got {cfg.optim.warmup_steps}"),
        (cfg.optim.grad_clip_norm >= 0, f"--optim.grad-clip-norm must be >= 0, got {cfg.optim.grad_clip_norm}"),
        (cfg.peft.r > 0, f"--peft.r must be > 0, got {cfg.peft.r}"),
        (0 <= cfg.peft.lora_dropout < 1, f"--peft.lora-dropout must be in [0, 1), got {cfg.peft.lora_dropout}"),
        (cfg.checkpoint.every >= 1, f"--checkpoint.every must be >= 1, got {cfg.checkpoint.every}"),
        (cfg.checkpoint.keep_last >= 1, f"--checkpoint.keep-last must be >= 1, got {cfg.checkpoint.keep_last}"),
        (cfg.dataset.eval_episodes >= 0, f"--dataset.eval-episodes must be >= 0, got {cfg.dataset.eval_episodes}"),
        (cfg.dataset.tolerance_s >= 0, f"--dataset.tolerance-s must be >= 0 seconds, got {cfg.dataset.tolerance_s}"),
        (cfg.dataset.video_cache_mb is None or cfg.dataset.video_cache_mb >= 0,
         f"--dataset.video-cache-mb must be >= 0 (0 disables the cache), got {cfg.dataset.video_cache_mb}"),
        (cfg.eval_every >= 1 and cfg.log_every >= 1, "--eval-every and --log-every must be >= 1"),
        (0 <= cfg.ema.decay < 1, f"--ema.decay must be in [0, 1) (0 turns the EMA off), got {cfg.ema.decay}"),
        (cfg.progress_every_s > 0, f"--progress-every-s must be > 0, got {cfg.progress_every_s}"),
        (cfg.cpu_threads is None or cfg.cpu_threads >= 1, f"--cpu-threads must be >= 1, got {cfg.cpu_threads}"),
        (cfg.wait_for_lock is None or cfg.wait_for_lock >= 0,
         f"--wait-for-lock must be >= 0 seconds, got {cfg.wait_for_lock}"),
        (all(v > 0 for v in cfg.peft.rank_pattern.values()),
         f"--peft.rank-pattern ranks must be > 0, got {dict(cfg.peft.rank_pattern)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.quant.load_in_8bit and cfg.quant.load_in_4bit:
        raise ConfigError("--quant.load-in-8bit and --quant.load-in-4bit exclude each other; pick one")
    if cfg.peft.init_from is not None and cfg.peft.method.upper() == PEFT_METHOD_FULL:
        raise ConfigError("--peft.init-from starts from an adapter, but --peft.method FULL trains without one; drop "
                          "one of them")
    if cfg.quant.enabled and cfg.peft.method.upper() == PEFT_METHOD_FULL:
        raise ConfigError("a quantized base cannot be trained in full (--peft.method FULL); use an adapter such as "
                          "LORA, or drop --quant.load-in-8bit/4bit")
    method = cfg.peft.method.upper()
    methods = sorted(t.value for t in PeftType)
    if method != PEFT_METHOD_FULL and method not in methods:
        raise ConfigError(f"unknown --peft.method {cfg.peft.method!r}; choose one of {methods} or FULL")
    if cfg.policy.path is None:
        raise ConfigError("--policy.path is required: a LeRobot-format policy folder or a Hub id")
    if not cfg.dataset.roots and cfg.dataset.repo_id is None:
        raise ConfigError("give the dataset with --dataset.root (a local folder) or --dataset.repo-id (Hub id)")
    from finetune.data.multi import check_data_options

    check_data_options(cfg.dataset)  # --dataset.root entries, episodes, weights, renames
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"--output-dir {cfg.output_dir} is an existing file, not a folder; pass a folder path "
                          "(it is created if missing)")
    if cfg.resume is True and not (cfg.checkpoints_dir / "last").exists():
        raise ConfigError(f"--resume: no checkpoint at {cfg.checkpoints_dir / 'last'}; start without --resume "
                          "(or use --resume auto, which starts fresh when there is none)")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run, or move it aside and start "
                          "a new one")
    unknown = sorted(set(cfg.log_with) - set(TRACKERS) - {"none"})
    if unknown:
        raise ConfigError(f"unknown --log-with {' '.join(unknown)}; choose from {' '.join(TRACKERS)} or none")


# Experiment trackers Accelerate integrates (accelerate.tracking); metrics.jsonl is always written beside them.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")

# Fields that may differ between a run and its resumption: how long it runs, what it reports and keeps, where it
# pushes, how data is read. Every other field changes the training trajectory, so resume refuses a difference.
RESUMABLE_CHANGES = frozenset({
    "steps", "log_every", "eval_every", "eval_batches", "resume", "overwrite", "log_with", "output_dir",
    "wait_for_lock", "progress_every_s", "log_level", "cpu_threads",
    "checkpoint.every", "checkpoint.keep_last", "checkpoint.trust_pickles", "dataset.num_workers",
    "dataset.video_cache_mb", "dataset.tolerance_s",
    "policy.repo_id", "policy.merged_repo_id", "nonfinite",
    "ema.use_for_eval", "dataset.decoder_threads", "dataset.prefetch_factor", "policy.attn_implementation",
    "policy.cpu_linear",
    "env.type", "env.task", "env.episodes", "env.eval_every", "env.max_steps", "env.image_size",
    "env.assets_dir",
})


def flat_fields(cfg: TrainConfig) -> dict[str, object]:
    """`{"peft.r": 64, "steps": 30000, ...}`: every leaf field by its dotted name."""
    out: dict[str, object] = {}

    def walk(prefix: str, obj) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(f"{prefix}{f.name}.", value)
            else:
                out[prefix + f.name] = list(value) if isinstance(value, tuple) else value

    walk("", cfg)
    roots = getattr(cfg.dataset, "roots", None)  # one folder given as a string or as a 1-tuple is the same dataset
    if roots is not None:
        out["dataset.root"] = list(roots)
    return out


def trajectory_changes(saved: TrainConfig, new: TrainConfig, ignore: Sequence[str] = ()) -> list[str]:
    """Fields whose change would make a resumed run train differently from the saved one, as `--flag: old -> new`."""
    old, cur = flat_fields(saved), flat_fields(new)
    return [f"--{name.replace('_', '-')}: {old.get(name)!r} -> {cur.get(name)!r}" for name in sorted(cur)
            if name not in RESUMABLE_CHANGES and name not in ignore and old.get(name) != cur.get(name)]


# --- presets ----------------------------------------------------------------------------------------------------------

SMOLVLA_LORA = TrainConfig(
    policy=PolicyOptions(path="lerobot/smolvla_base"),
    # LeRobot's SmolVLA LoRA recipe: r 64 on the expert's q/v and the action/state projections; its PEFT guide's
    # command (lr 1e-3 -> 1e-4, batch 32, 50k steps) on SmolVLAConfig's schedule (1000 warmup, cosine over 30k).
    peft=PeftOptions(method="LORA", r=64, lora_alpha=64),
    optim=OptimOptions(lr=1e-3, betas=(0.9, 0.95), decay_lr=1e-4, warmup_steps=1000, decay_steps=30_000,
                       grad_clip_norm=10.0),
    output_dir="runs/smolvla_lora",
    steps=50_000,
    batch_size=32,
)

# QLoRA-style: the same LoRA recipe on a quantized frozen base, with activation checkpointing.
SMOLVLA_QLORA8 = dataclasses.replace(
    SMOLVLA_LORA, quant=QuantOptions(load_in_8bit=True), output_dir="runs/smolvla_qlora8",
    policy=dataclasses.replace(SMOLVLA_LORA.policy, dtype="bfloat16", gradient_checkpointing=True))
SMOLVLA_QLORA4 = dataclasses.replace(
    SMOLVLA_LORA, quant=QuantOptions(load_in_4bit=True), output_dir="runs/smolvla_qlora4",
    policy=dataclasses.replace(SMOLVLA_LORA.policy, dtype="bfloat16", gradient_checkpointing=True))

# pi0 / pi0.5: LeRobot's (= openpi's) full fine-tune recipe is AdamW lr 2.5e-5 (betas 0.9/0.95, weight decay 0.01),
# 1000 warmup steps, cosine decay to 2.5e-6 over 30k steps, grad clip 1.0; LeRobot's PEFT guide scales the peak and
# final lr by 10 for LoRA. Batch as LeRobot's pi0 / pi0.5 docs (32 / 64), bf16 base and gradient checkpointing on.
# Image size (224), tokenizer length (48 / 200) and normalization (MEAN_STD / QUANTILES) come with the policy config.
PI0_LORA = TrainConfig(
    policy=PolicyOptions(path="lerobot/pi0_base", dtype="bfloat16", gradient_checkpointing=True),
    peft=PeftOptions(method="LORA", r=64, lora_alpha=64),
    optim=OptimOptions(lr=2.5e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, decay_lr=2.5e-5, warmup_steps=1000,
                       decay_steps=30_000, grad_clip_norm=1.0),
    output_dir="runs/pi0_lora",
    steps=30_000,
    batch_size=32,
)
PI05_LORA = dataclasses.replace(PI0_LORA, policy=dataclasses.replace(PI0_LORA.policy, path="lerobot/pi05_base"),
                                output_dir="runs/pi05_lora", batch_size=64)

PI0_QLORA8 = dataclasses.replace(PI0_LORA, quant=QuantOptions(load_in_8bit=True), output_dir="runs/pi0_qlora8")
PI0_QLORA4 = dataclasses.replace(PI0_LORA, quant=QuantOptions(load_in_4bit=True), output_dir="runs/pi0_qlora4")

PRESETS: dict[str, tuple[str, TrainConfig]] = {
    "smolvla_lora": ("SmolVLA (450M) with LeRobot's LoRA recipe; give --policy.path and --dataset.root.", SMOLVLA_LORA),
    "smolvla_qlora8": ("smolvla_lora on an 8-bit frozen base, gradient checkpointing on.", SMOLVLA_QLORA8),
    "smolvla_qlora4": ("smolvla_lora on a 4-bit NF4 frozen base, gradient checkpointing on.", SMOLVLA_QLORA4),
    "pi0_lora": ("pi0 (3.2B: PaliGemma 3B + Gemma 300M expert) with LoRA on LeRobot's pi0 recipe (lr x10), bf16 base, "
                 "gradient checkpointing; 224px images, 48 tokens, MEAN_STD.", PI0_LORA),
    "pi05_lora": ("pi0.5 (3.4B, adaRMS expert) with LoRA on LeRobot's pi0.5 recipe (lr x10), bf16 base, gradient "
                  "checkpointing; 224px images, 200-token prompt with the binned state, QUANTILES.", PI05_LORA),
    "pi0_qlora8": ("pi0_lora on an 8-bit frozen base.", PI0_QLORA8),
    "pi0_qlora4": ("pi0_lora on a 4-bit NF4 frozen base.", PI0_QLORA4),
}


def cli(args: Sequence[str] | None = None, console_outputs: bool = True) -> TrainConfig:
    """Parse `<preset> [--flags]` into a TrainConfig. LeRobot's `lerobot-train` flags and `--config_path` are
    translated first (finetune/lerobot_cli.py), each translation printed once as a notice."""
    import sys

    from finetune.lerobot_cli import LeRobotFlagError, field_kinds, translate_args

    try:
        translation = translate_args(sys.argv[1:] if args is None else args, field_kinds(TrainConfig), list(PRESETS))
        cfg = translation.apply(tyro.extras.overridable_config_cli(
            PRESETS, args=translation.args, use_underscores=False, console_outputs=console_outputs,
            description="Fine-tune a VLA policy with PEFT adapters.",
        ))
        if console_outputs:
            print("\n".join(translation.notices), end="\n" if translation.notices else "")
        return cfg
    except LeRobotFlagError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict` output (e.g. a checkpoint's train_config.json)."""

    def build(cls, values: dict):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            if dataclasses.is_dataclass(f.default):
                value = build(type(f.default), value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    return build(TrainConfig, data)


def read_train_config(folder: str | Path) -> TrainConfig | None:
    """The train_config.json a run or checkpoint folder holds, None when it has none (or it is LeRobot's)."""
    import json

    path = Path(folder) / "train_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if is_lerobot_train_config(data):
        return None
    return from_dict(data)


def is_lerobot_train_config(data: dict) -> bool:
    """LeRobot's own train_config.json (a lerobot-train checkpoint): its policy section has a `type`, ours a path."""
    return isinstance(data.get("policy"), dict) and "type" in data["policy"]
