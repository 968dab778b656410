"""LeRobot's `lerobot-train` command line, spoken by `finetune/train.py <preset>`.

`translate_args` rewrites LeRobot spellings into this suite's flags before tyro parses them:

- draccus syntax: `--flag=value`, underscores, lists as `["a","b"]` / `[a,b]`, dicts as JSON, `null`, `true/false`;
- LeRobot names with an equivalent here (`--peft.method_type`, `--policy.optimizer_lr`, `--save_freq`, ...);
- `--config_path train_config.json`: a LeRobot training config, loaded first so the command line overrides it.

Every rewrite is reported as a one-line notice. A LeRobot flag with no equivalent is refused with a message naming
what to use here; a flag that is neither ours nor LeRobot's is an error. Some LeRobot meanings only resolve once
the whole config is known (the scheduler's auto-shortening, `--save_freq=0`, `--policy.push_to_hub`): those come
back as `adjustments`, applied to the parsed config.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class LeRobotFlagError(ValueError):
    """A LeRobot flag or config entry that cannot be honoured here; the message names it and what to use."""


Adjustment = Callable[[Any], tuple[Any, str | None]]  # parsed TrainConfig -> (TrainConfig, notice)


@dataclass
class Translation:
    args: list[str]
    """Arguments for tyro: the preset, then the config file's settings, then the command line's."""
    notices: list[str] = field(default_factory=list)
    adjustments: list[Adjustment] = field(default_factory=list)
    """Applied in order to the parsed config (LeRobot meanings that depend on several fields)."""

    def apply(self, cfg: Any) -> Any:
        """The parsed config with the adjustments made; their notices are added to `notices`."""
        for adjust in self.adjustments:
            cfg, notice = adjust(cfg)
            if notice:
                self.notices.append(notice)
        return cfg


# --- this suite's fields ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldKind:
    """How a field of ours takes its value on tyro's command line."""

    kind: str  # "bool", "seq" (tuple/list: several tokens), "dict" (key value pairs), "scalar"
    optional: bool  # accepts None


def field_kinds(config_cls: type) -> dict[str, FieldKind]:
    """Dotted field name (underscores) -> kind, for every leaf of a nested config dataclass."""
    out: dict[str, FieldKind] = {}
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in field_kinds(tp).items()})
            continue
        args = typing.get_args(tp)
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
        if optional:
            tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp) or tp
        kind = ("bool" if tp is bool else "seq" if origin in (tuple, list) else "dict" if origin is dict
                else "scalar")
        out[f.name] = FieldKind(kind, optional)
    return out


# --- LeRobot's names --------------------------------------------------------------------------------------------------

# LeRobot name -> our field with the same meaning (values convert by our field's kind).
RENAMED = {
    "peft.method_type": "peft.method",
    "policy.pretrained_path": "policy.path",
    "policy.optimizer_lr": "optim.lr",  # also the schedule's peak, as LeRobot's preset
    "policy.optimizer_betas": "optim.betas",
    "policy.optimizer_eps": "optim.eps",
    "policy.optimizer_weight_decay": "optim.weight_decay",
    "policy.optimizer_grad_clip_norm": "optim.grad_clip_norm",
    "policy.scheduler_warmup_steps": "optim.warmup_steps",
    "policy.scheduler_decay_lr": "optim.decay_lr",
    "num_workers": "dataset.num_workers",
    "prefetch_factor": "dataset.prefetch_factor",
    "log_freq": "log_every",
    "eval_freq": "env.eval_every",  # LeRobot <= 0.4: simulator evaluation every N steps
    "env_eval_freq": "env.eval_every",  # LeRobot >= 0.5
    "env.episode_length": "env.max_steps",
    "eval.n_episodes": "env.episodes",
    "rename_map": "dataset.rename_map",
    "tolerance_s": "dataset.tolerance_s",
}

OPTIMIZER_HINT = ("use --policy.optimizer_* / --policy.scheduler_* (or --optim.*): the optimizer is always AdamW "
                  "with LeRobot's cosine-decay-with-warmup schedule")
ENV_HINT = ("the simulator wrappers (finetune.envs) fix it; supported: --env.type, --env.task, --env.episode_length, "
            "--eval.n_episodes, --eval_freq")

# LeRobot name (or "section.*") -> why it has no equivalent and what to use here.
REFUSED = {
    "job_name": "runs are not named here (no wandb, no dated output folder): name the run folder with --output_dir",
    "policy.type": "this suite fine-tunes a pretrained policy: give its folder or Hub id with --policy.path "
                   "(training a policy from scratch is not supported)",
    "policy.device": "the device comes from Accelerate: `accelerate launch --cpu ...` for CPU, CUDA_VISIBLE_DEVICES "
                     "to choose GPUs (the accelerate_configs/*.yaml files for multi-GPU)",
    "policy.private": "pushed repos use your Hub account's default visibility; change it on the Hub after the push",
    "policy.tags": "the model card's tags are written by finetune/export/publish.py; edit README.md on the Hub",
    "policy.license": "the model card is written by finetune/export/publish.py; edit README.md on the Hub",
    "use_policy_training_preset": OPTIMIZER_HINT,
    "optimizer.*": OPTIMIZER_HINT,
    "scheduler.*": OPTIMIZER_HINT,
    "save_checkpoint": "checkpoints are always saved (at least the last one, needed for the adapter): space them with "
                       "--checkpoint.every and bound them with --checkpoint.keep_last",
    "save_checkpoint_to_hub": "only the last checkpoint is pushed, at the end, with --policy.repo_id",
    "cudnn_deterministic": "not exposed here; set torch.backends.cudnn.deterministic in your own launcher",
    "persistent_workers": "workers persist whenever --num_workers > 0",
    "dataloader_multiprocessing_context": "the DataLoader uses the platform's default start method",
    "max_eval_samples": "the held-out evaluation uses --eval_batches batches of --batch_size frames",
    "dataset.eval_split": "hold out the last N episodes with --dataset.eval_episodes N",
    "dataset.revision": "give a local folder with --dataset.root, or the Hub id's default revision is used",
    "dataset.streaming": "datasets are read from a local folder (--dataset.root) or the Hub cache",
    "dataset.repo_type": "datasets are read from a local folder (--dataset.root) or a Hub dataset repo",
    "dataset.use_imagenet_stats": "images are scaled to [-1, 1] as the policy expects; drop the flag",
    "dataset.return_uint8": "drop the flag (frames travel as uint8 through the loader and become float on the "
                            "training device)",
    "dataset.depth_output_unit": "depth cameras are not supported",
    "dataset.image_transforms.*": "augmentation is set by --dataset.image_transforms.enable / .max_num_transforms / "
                                  ".brightness / .contrast / .saturation / .hue / .sharpness (ranges), "
                                  ".affine_degrees / .affine_translate and .weights",
    "wandb.project": "the wandb project is named after the run folder (--output_dir)",
    "wandb.entity": "set the WANDB_ENTITY environment variable",
    "wandb.mode": "set the WANDB_MODE environment variable (offline: also automatic when HF_HUB_OFFLINE=1)",
    "wandb.*": "wandb is an Accelerate tracker here (--wandb.enable=true or --log_with tensorboard wandb); its "
               "other settings come from WANDB_* environment variables",
    "job.*": "training runs where it is launched: `accelerate launch` or launch.sh (SLURM / multi-node)",
    "sample_weighting.*": "no sample weighting (RA-BC) here",
    "use_rabc": "no sample weighting (RA-BC) here",
    "reward_model.*": "reward-model training is not supported here",
    "ema.*": "the EMA here has a constant decay: --ema.decay (e.g. 0.999), 0 turns it off",
    "eval_steps": "the held-out action MSE runs every --eval_every steps",
    "env.*": ENV_HINT,
    "eval.*": ENV_HINT,
    "policy.*": "a policy-config field is not overridden from the command line here: the policy folder's config.json "
                "(--policy.path) holds it; --policy.chunk_size and --policy.num_steps are the overrides supported",
}

VIDEO_BACKENDS = ("torchcodec", "pyav", "video_reader")

TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
NULL = {"null", "none", "~"}

# Entries of a LeRobot train_config.json that describe the saved run rather than what to train.
FILE_SKIP_QUIETLY = {"resume", "checkpoint_path", "job_name", "policy.device", "policy.use_peft"}


def _refusal(name: str) -> str | None:
    if name in REFUSED:
        return REFUSED[name]
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        key = ".".join(parts[:i]) + ".*"
        if key in REFUSED:
            return REFUSED[key]
    return None


def _bool(name: str, text: str) -> bool:
    low = text.lower()
    if low in TRUE or low in FALSE:
        return low in TRUE
    raise LeRobotFlagError(f"--{name}={text}: expected true or false")


def _is_null(text: str) -> bool:
    return text.strip().lower() in NULL


def _list(name: str, text: str) -> list[str]:
    """`["a","b"]`, `[a, b]` (draccus / JSON / YAML) -> ['a', 'b']; anything else is one item."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [text]
    try:
        items = yaml.safe_load("[" + text[1:-1] + "]")
    except yaml.YAMLError:
        return [text]  # e.g. a regex such as [qv]_proj: not a list
    if not isinstance(items, list) or any(isinstance(i, (list, dict)) or i is None for i in items):
        raise LeRobotFlagError(f"--{name}={text}: expected a flat list such as [\"a\",\"b\"]")
    return [str(i) for i in items]


def _dict(name: str, text: str) -> list[str]:
    """`{"a": "b"}` -> ['a', 'b'] (tyro's key value pairs)."""
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError:
        items = None
    if not isinstance(items, dict):
        raise LeRobotFlagError(f"--{name}={text}: expected a mapping such as '{{\"old.key\": \"new.key\"}}'")
    return [str(t) for k, v in items.items() for t in (k, v)]


def _values_of(out: list[str]) -> list[str]:
    """The value tokens of one translated option (`--a=1` -> ['1'], `--a x y` -> ['x', 'y'])."""
    if not out:
        return []
    _, eq, value = out[0].partition("=")
    return ([value] if eq else []) + out[1:]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _negated(name: str) -> str:
    head, _, leaf = name.rpartition(".")
    return _flag(f"{head}.no_{leaf}" if head else f"no_{leaf}")


# --- one option at a time ---------------------------------------------------------------------------------------------

@dataclass
class _Option:
    spelled: str  # as written, e.g. --peft.method_type=LORA
    name: str  # normalized: no dashes in front, underscores, e.g. peft.method_type
    values: list[str]
    had_equals: bool
    from_file: bool = False

    @property
    def shown(self) -> str:
        return f"{self.name}={self.values[0]}" if self.from_file and self.values else self.spelled


class _Translator:
    def __init__(self, kinds: dict[str, FieldKind], presets: Sequence[str]):
        self.kinds = kinds
        self.presets = presets
        self.notices: list[str] = []
        self.adjustments: list[Adjustment] = []
        self.unused_from_file: list[str] = []
        self.push_to_hub: bool | None = None
        self.lerobot_schedule = False  # --policy.scheduler_decay_steps given
        self.lerobot_optim = False  # some --policy.optimizer_* / scheduler_* given

    # value conversion onto one of our fields
    def ours(self, target: str, opt: _Option, values: list[str] | None = None) -> list[str]:
        values = opt.values if values is None else values
        kind = self.kinds[target]
        if kind.kind == "bool" and kind.optional:  # tyro takes `bool | None` as a value: True, False or None
            if len(values) != 1:
                raise LeRobotFlagError(f"{opt.shown}: expected one value: true, false or null")
            value = "None" if _is_null(values[0]) else str(_bool(opt.name, values[0]))
            return [f"{_flag(target)}={value}"]
        if kind.kind == "bool":
            if not values:
                return [_flag(target)]
            if len(values) != 1:
                raise LeRobotFlagError(f"{opt.shown}: expected one true/false value")
            return [_flag(target) if _bool(opt.name, values[0]) else _negated(target)]
        if not values:
            return [_flag(target)]  # a flag of ours that takes no value (e.g. --resume); tyro judges it
        if len(values) == 1 and _is_null(values[0]):
            if kind.optional:
                return [f"{_flag(target)}=None"]
            if kind.kind in ("seq", "dict"):
                return [_flag(target)]  # empty, as LeRobot's null for its list defaults
            if opt.from_file:
                return []  # LeRobot left it unset: keep the preset's value
            raise LeRobotFlagError(f"{opt.shown}: {_flag(target)} cannot be null; give a value")
        if kind.kind == "seq" and len(values) == 1:
            return [_flag(target), *_list(opt.name, values[0])]
        if kind.kind == "dict" and len(values) == 1 and values[0].lstrip().startswith("{"):
            return [_flag(target), *_dict(opt.name, values[0])]
        if kind.kind == "scalar" and len(values) != 1:
            raise LeRobotFlagError(f"{opt.shown}: expected one value, got {len(values)}")
        if len(values) == 1:
            return [f"{_flag(target)}={values[0]}"]
        return [_flag(target), *values]

    def note(self, opt: _Option, out: list[str], why: str = "") -> list[str]:
        where = "config" if opt.from_file else "lerobot"
        result = " ".join(out) if out else "(nothing to set)"
        self.notices.append(f"{where} {opt.shown} -> {result}{f'  ({why})' if why else ''}")
        return out

    def one_value(self, opt: _Option) -> str:
        if len(opt.values) != 1:
            raise LeRobotFlagError(f"{opt.shown}: expected one value")
        return opt.values[0]

    def translate(self, opt: _Option) -> list[str]:
        name = opt.name
        if name in ("help", "h"):
            return [opt.spelled]
        special = getattr(self, "_" + name.replace(".", "__"), None)
        if special is not None:
            return special(opt)
        if name in self.kinds:
            out = self.ours(name, opt)
            spelled_null = len(opt.values) == 1 and _is_null(opt.values[0])  # `--log-with none`: ours as typed
            if opt.from_file or (_values_of(out) != opt.values and not spelled_null):
                self.note(opt, out)
            return out
        head, _, leaf = name.rpartition(".")
        negated = f"{head}.{leaf[3:]}" if head else leaf[3:]
        if leaf.startswith("no_") and negated in self.kinds and self.kinds[negated].kind == "bool":
            return [opt.spelled, *opt.values]  # tyro's own negation, e.g. --no-resume
        if name in RENAMED:
            target = RENAMED[name]
            self.lerobot_optim |= target.startswith("optim.")
            return self.note(opt, self.ours(target, opt))
        why = _refusal(name)
        if opt.from_file:
            if name not in FILE_SKIP_QUIETLY and opt.values[0] not in ("null", "false", "{}", "[]"):
                self.unused_from_file.append(name)
            return []
        if why is not None:
            raise LeRobotFlagError(f"--{name} (lerobot-train) has no equivalent: {why}")
        raise LeRobotFlagError(f"unknown flag --{name}: neither an option of this suite (see --help) nor a "
                               "lerobot-train flag it maps")

    # LeRobot flags whose meaning needs more than a rename ------------------------------------------------------------

    def _policy__input_features(self, opt: _Option) -> list[str]:
        return self._features(opt)

    def _policy__output_features(self, opt: _Option) -> list[str]:
        return self._features(opt)

    def _features(self, opt: _Option) -> list[str]:
        value = self.one_value(opt) if not opt.from_file else "null"
        if _is_null(value) or value.strip() == "{}":
            return self.note(opt, [], "features always come from the dataset here, as LeRobot does with null")
        raise LeRobotFlagError(f"--{opt.name}: features always come from the dataset here; pass null (or drop the "
                               "flag) and rename dataset keys with --rename_map / --dataset.rename_map")

    def _resume(self, opt: _Option) -> list[str]:
        """Ours: bare `--resume` (strict) or `--resume auto`; LeRobot's `--resume=true|false` means the same."""
        if not opt.values:
            return ["--resume"]
        value = self.one_value(opt).lower()
        if value == "auto":
            return ["--resume", "auto"]
        return ["--resume", "true" if _bool(opt.name, value) else "false"]

    def _policy__push_to_hub(self, opt: _Option) -> list[str]:
        self.push_to_hub = _bool(opt.name, opt.values[0]) if opt.values else True
        why = ("--policy.repo_id is pushed at the end" if self.push_to_hub else
               "nothing is pushed: --policy.repo_id is dropped")
        return self.note(opt, [], why)

    def _dataset__video_backend(self, opt: _Option) -> list[str]:
        backend = self.one_value(opt)
        if backend not in VIDEO_BACKENDS:
            raise LeRobotFlagError(f"{opt.shown}: expected one of LeRobot's {', '.join(VIDEO_BACKENDS)}")
        return self.note(opt, [], "frames are decoded with PyAV here whatever the backend, each looked up by its "
                                  "timestamp within --dataset.tolerance-s as LeRobot's backends do")

    def _policy__use_amp(self, opt: _Option) -> list[str]:
        on = _bool(opt.name, opt.values[0]) if opt.values else True
        if not on:
            return self.note(opt, [], "autocast follows --mixed-precision, else the base's --policy.dtype")
        import torch

        precision = "fp16" if torch.cuda.is_available() else "bf16"  # torch.autocast's default for the device
        return self.note(opt, [f"--mixed-precision={precision}"], "torch.autocast's default dtype on this device")

    def _policy__scheduler_decay_steps(self, opt: _Option) -> list[str]:
        self.lerobot_schedule = True
        return self.note(opt, self.ours("optim.decay_steps", opt),
                         "as LeRobot: warmup and decay shrink in proportion when --steps is shorter")

    def _peft__lora_alpha(self, opt: _Option) -> list[str]:
        if len(opt.values) == 1 and _is_null(opt.values[0]):
            return self.note(opt, ["--peft.lora-alpha=8"], "PEFT's LoraConfig default, which LeRobot uses for null")
        out = self.ours("peft.lora_alpha", opt)
        return self.note(opt, out) if opt.from_file else out

    def _dataset__image_transforms(self, opt: _Option) -> list[str]:
        """A config file's whole image_transforms section (LeRobot's torchvision-named ops) onto ours."""
        section = json.loads(opt.values[0]) or {}
        out = [f"--dataset.image-transforms.{'enable' if section.get('enable') else 'no-enable'}"]
        if "max_num_transforms" in section:
            out.append(f"--dataset.image-transforms.max-num-transforms={section['max_num_transforms']}")
        names = ("brightness", "contrast", "saturation", "hue", "sharpness", "affine")
        tfs = section.get("tfs") or {}
        unknown = [name for name in tfs if name not in names]
        if unknown and section.get("enable"):
            raise LeRobotFlagError(f"--config_path: dataset.image_transforms.tfs {unknown} have no equivalent: "
                                   f"{REFUSED['dataset.image_transforms.*']}")
        for name in names[:5]:
            if name in tfs and name in (tfs[name].get("kwargs") or {}):
                low, high = tfs[name]["kwargs"][name]
                out += [f"--dataset.image-transforms.{name}", str(low), str(high)]
        affine = (tfs.get("affine") or {}).get("kwargs") or {}
        if "degrees" in affine:
            degrees = affine["degrees"]  # (-d, d) or d, as torchvision's RandomAffine
            degrees = max(abs(d) for d in degrees) if isinstance(degrees, list) else degrees
            out.append(f"--dataset.image-transforms.affine-degrees={degrees}")
        if "translate" in affine:
            out.append(f"--dataset.image-transforms.affine-translate={affine['translate'][0]}")
        if tfs:
            weights = [str((tfs.get(name) or {}).get("weight", 0.0)) for name in names]
            out += ["--dataset.image-transforms.weights", *weights]
        return self.note(opt, out)

    def _save_freq(self, opt: _Option) -> list[str]:
        value = self.one_value(opt)
        if value.lstrip("-").isdigit() and int(value) <= 0:
            self.adjustments.append(_only_final_checkpoint)
            return self.note(opt, [], "only the final checkpoint is saved (--checkpoint.every set to --steps)")
        return self.note(opt, self.ours("checkpoint.every", opt))

    def _eval_steps(self, opt: _Option) -> list[str]:
        value = self.one_value(opt)
        if value.isdigit() and int(value) == 0:
            return self.note(opt, ["--dataset.eval-episodes=0"], "no held-out evaluation, as LeRobot's default")
        return self.note(opt, self.ours("eval_every", opt), "held-out action MSE every N steps")

    def _eval__batch_size(self, opt: _Option) -> list[str]:
        return self.note(opt, [], "simulator episodes run one after another here; results do not depend on it")

    def _eval__use_async_envs(self, opt: _Option) -> list[str]:
        return self.note(opt, [], "simulator episodes run one after another here; results do not depend on it")

    def _wandb__enable(self, opt: _Option) -> list[str]:
        if opt.values and not _bool(opt.name, opt.values[0]):
            return self.note(opt, [], "no wandb (metrics.jsonl and the --log_with trackers)")
        self.adjustments.append(_log_with_wandb)
        return self.note(opt, [], "wandb added to --log_with (Accelerate's tracker; project = the run folder's name)")

    def _ema__enable(self, opt: _Option) -> list[str]:
        if opt.values and not _bool(opt.name, opt.values[0]):
            return self.note(opt, ["--ema.decay=0"], "no EMA")
        self.adjustments.append(_needs_ema_decay)
        return self.note(opt, [], "the EMA is on when --ema.decay is set (a constant decay, no warmup schedule)")


def _only_final_checkpoint(cfg: Any) -> tuple[Any, str | None]:
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every=cfg.steps)), None


def _lerobot_schedule(cfg: Any) -> tuple[Any, str | None]:
    """LeRobot's cosine schedule shrinks warmup and decay in proportion when the run is shorter than the decay."""
    o = cfg.optim
    if o.decay_steps is None:
        return cfg, (f"lerobot schedule: this preset decays the lr over all --steps ({cfg.steps}); LeRobot's SmolVLA "
                     "preset decays over 30000 steps (shorter runs: over --steps), then holds decay_lr: add "
                     "--policy.scheduler_decay_steps=30000 for exactly that")
    if cfg.steps >= o.decay_steps:
        return cfg, None
    warmup = int(o.warmup_steps * cfg.steps / o.decay_steps)
    notice = (f"lerobot schedule: --steps {cfg.steps} < decay steps {o.decay_steps}: warmup {o.warmup_steps} -> "
              f"{warmup}, decay {o.decay_steps} -> {cfg.steps} (as LeRobot)")
    return dataclasses.replace(cfg, optim=dataclasses.replace(o, warmup_steps=warmup, decay_steps=cfg.steps)), notice


# --- the command line and the config file -----------------------------------------------------------------------------

def split_options(args: Sequence[str]) -> tuple[list[str], list[_Option]]:
    """Leading positionals (the preset), then options: `--name[=value]` followed by its value tokens."""
    positionals: list[str] = []
    options: list[_Option] = []
    for token in args:
        if token.startswith("--") or (token.startswith("-") and token[1:2].isalpha() and len(token) == 2):
            head, eq, value = token.partition("=")
            name = head.lstrip("-").replace("-", "_")
            options.append(_Option(token, name, [value] if eq else [], bool(eq)))
        elif options:
            options[-1].values.append(token)
        else:
            positionals.append(token)
    return positionals, options


def file_options(path: str) -> tuple[list[_Option], dict]:
    """A LeRobot train_config.json as options (`section.key` = value in draccus syntax)."""
    p = Path(path)
    if p.is_dir():
        p = p / "train_config.json"
    if not p.is_file():
        raise LeRobotFlagError(f"--config_path {path}: no such file; give a LeRobot train_config.json (as saved in "
                               "checkpoints/<step>/pretrained_model/)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise LeRobotFlagError(f"--config_path {p}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or "dataset" not in data:
        raise LeRobotFlagError(f"--config_path {p}: not a LeRobot training config (no 'dataset' section)")

    def text(value: Any) -> str:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (list, dict)):
            return json.dumps(value)
        return str(value)

    flat: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict) and key != "rename_map":
            flat.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            flat.append((key, value))
    return [_Option(f"--{k}={text(v)}", k, [text(v)], True, from_file=True) for k, v in flat], data


def _config_file_options(data: dict, options: list[_Option], policy_given: bool) -> list[_Option]:
    """Keep what a LeRobot run trained with: its optimizer either from the policy preset or its own sections."""
    policy = data.get("policy") or {}
    # with the policy preset (LeRobot's default) the optimizer sections only echo the policy's optimizer_* fields
    preset = data.get("use_policy_training_preset", True)
    options = [o for o in options if not o.name.startswith(
        ("optimizer.", "scheduler.") if preset else ("optimizer.", "scheduler.", "policy.optimizer_",
                                                     "policy.scheduler_"))]
    if not preset:
        options += _optimizer_sections(data)
    keep = []
    for o in options:
        if o.name in ("use_policy_training_preset", "resume"):
            continue
        if o.name == "policy.type":
            continue  # the policy type comes from the --policy.path folder's config.json
        value = o.values[0] if o.values else ""
        if o.name.startswith("policy.") and o.name[7:] not in _POLICY_FILE_KEYS and not o.name.startswith(
                ("policy.optimizer_", "policy.scheduler_")):
            continue  # the policy's architecture: from the policy folder
        if _is_null(value) and (o.name.startswith("env.") or o.name in ("env", "peft", "dataset.root")):
            continue
        keep.append(o)
    if data.get("env") is None:
        keep = [o for o in keep if o.name not in ("eval_freq", "env_eval_freq") and not o.name.startswith("eval.")]
    if policy.get("pretrained_path") is None and not policy_given:
        raise LeRobotFlagError("--config_path: the LeRobot config has no policy.pretrained_path (a run from scratch); "
                               "give the pretrained policy with --policy.path")
    refused = [(o.name, o.values[0]) for o in keep if o.name in _FILE_REFUSED_WHEN and
               _FILE_REFUSED_WHEN[o.name](o.values[0])]
    if refused:
        name, value = refused[0]
        raise LeRobotFlagError(f"--config_path: {name} = {value} changes what is trained and has no equivalent here: "
                               f"{_refusal(name)}")
    return keep


_POLICY_FILE_KEYS = {"pretrained_path", "repo_id", "push_to_hub", "use_amp", "chunk_size", "num_steps", "dtype",
                     "gradient_checkpointing", "input_features", "output_features"}
_FILE_REFUSED_WHEN: dict[str, Callable[[str], bool]] = {
    "sample_weighting.type": lambda v: not _is_null(v),
    "use_rabc": lambda v: v == "true",
    "ema.enable": lambda v: v == "true",
}


def _optimizer_sections(data: dict) -> list[_Option]:
    """use_policy_training_preset=false: LeRobot trained with its own optimizer/scheduler sections."""
    opt, sched = data.get("optimizer") or {}, data.get("scheduler") or {}
    if opt.get("type", "adamw") != "adamw":
        raise LeRobotFlagError(f"--config_path: optimizer.type {opt.get('type')!r} has no equivalent: {OPTIMIZER_HINT}")
    if sched and sched.get("type") != "cosine_decay_with_warmup":
        raise LeRobotFlagError(f"--config_path: scheduler.type {sched.get('type')!r} has no equivalent: "
                               f"{OPTIMIZER_HINT}")
    values = {f"policy.optimizer_{k}": opt[k] for k in ("lr", "betas", "eps", "weight_decay", "grad_clip_norm")
              if k in opt}
    if sched:
        values["policy.scheduler_warmup_steps"] = sched["num_warmup_steps"]
        values["policy.scheduler_decay_steps"] = sched["num_decay_steps"]
        # LambdaLR scales the optimizer's lr: the final lr is lr * decay_lr / peak_lr
        values["policy.scheduler_decay_lr"] = opt.get("lr", sched["peak_lr"]) * sched["decay_lr"] / sched["peak_lr"]
    return [_Option(f"--{k}={json.dumps(v)}", k, [json.dumps(v)], True, from_file=True) for k, v in values.items()]


def _preset_for(data: dict, presets: Sequence[str]) -> str | None:
    kind = (data.get("policy") or {}).get("type")
    name = {"smolvla": "smolvla_lora", "pi0": "pi0_lora", "pi05": "pi05_lora"}.get(kind or "")
    return name if name in presets else None


def translate_args(args: Sequence[str], kinds: dict[str, FieldKind], presets: Sequence[str]) -> Translation:
    """LeRobot spellings -> this suite's flags (see the module docstring)."""
    positionals, options = split_options(args)
    tr = _Translator(kinds, presets)
    file_args: list[str] = []
    config_path = [o for o in options if o.name == "config_path"]
    options = [o for o in options if o.name != "config_path"]
    if config_path:
        if len(config_path[-1].values) != 1:
            raise LeRobotFlagError("--config_path needs one value: a LeRobot train_config.json")
        loaded, data = file_options(config_path[-1].values[0])
        if not positionals and (preset := _preset_for(data, presets)):
            positionals = [preset]
            tr.notices.append(f"config {config_path[-1].values[0]}: preset {preset} (policy type "
                              f"{data['policy']['type']})")
        policy_given = any(o.name in ("policy.path", "policy.pretrained_path") for o in options)
        if data.get("peft") is None:
            tr.notices.append("config: the LeRobot run trained without PEFT (peft: null); this run uses the preset's "
                              "--peft.* (--peft.method FULL trains every parameter)")
        for opt in _config_file_options(data, loaded, policy_given):
            file_args += tr.translate(opt)
        if tr.unused_from_file:
            tr.notices.append(f"config: not used here (no equivalent, or describes the saved run): "
                              f"{', '.join(tr.unused_from_file)}")
    cli_args = [t for opt in options for t in tr.translate(opt)]
    out = [*positionals, *file_args, *cli_args]
    if tr.push_to_hub is False:
        out.append("--policy.repo-id=None")
    elif tr.push_to_hub:
        tr.adjustments.append(_needs_repo_id)
    if tr.lerobot_schedule or tr.lerobot_optim:  # the schedule was set LeRobot's way: it behaves as LeRobot's
        tr.adjustments.append(_lerobot_schedule)
    return Translation(out, tr.notices, tr.adjustments)


def _log_with_wandb(cfg: Any) -> tuple[Any, str | None]:
    trackers = tuple(t for t in cfg.log_with if t != "none")
    return dataclasses.replace(cfg, log_with=trackers + ("wandb",) if "wandb" not in trackers else trackers), None


def _needs_ema_decay(cfg: Any) -> tuple[Any, str | None]:
    if not cfg.ema.decay:
        raise LeRobotFlagError("--ema.enable=true: LeRobot's warmup EMA schedule is not available here; give a "
                               "constant --ema.decay (e.g. 0.999), as LeRobot's --ema.decay")
    return cfg, None


def _needs_repo_id(cfg: Any) -> tuple[Any, str | None]:
    if not cfg.policy.repo_id:
        raise LeRobotFlagError("--policy.push_to_hub=true needs --policy.repo_id ORG/NAME (as in LeRobot)")
    return cfg, None
