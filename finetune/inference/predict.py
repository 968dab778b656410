"""Actions from a trained policy, in the robot's units: the call a robot loop makes.

```python
from finetune.inference.predict import Predictor
predictor = Predictor.from_checkpoint("runs/my_task/checkpoints/last")    # adapter (+ its base) or a merged folder
chunk = predictor({"observation.images.top": rgb_uint8_hwc, "observation.state": joints, "task": "pick the cube"})
# chunk: np.ndarray (chunk_size, action_dim), normalization undone
```

`finetune-predict --checkpoint ... --dataset.root ...` predicts on dataset frames and prints them beside the
recorded actions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro
from torch import Tensor, nn

from finetune import _quiet  # noqa: F401 - first: silences notices raised while peft imports bitsandbytes
from finetune.config import read_train_config
from finetune.entry import console_script, exit_on
from finetune.hub import load_tokenizer, resolve_repo
from finetune.inference.loading import load_trained_policy
from finetune.policies.base import OBS_STATE, TASK, PolicyConfig
from finetune.policies.common import DTYPES
from finetune.policies.lerobot_processor import read_processor_stats
from finetune.policies.processor import STATS_FILE, PolicyProcessor, load_stats
from finetune.policies.relative_actions import RAW_STATE
from finetune.training.run_lock import reading_checkpoint


class ObservationError(ValueError):
    """An observation the policy cannot take; the message names what is missing or wrong."""


def load_normalization_stats(folder: Path) -> dict[str, dict[str, Tensor]]:
    """finetune's stats file, else the normalizer state of LeRobot's processor files; a clear error when neither."""
    if (folder / STATS_FILE).is_file():
        return load_stats(folder)
    stats = read_processor_stats(folder)
    if stats is None:
        raise FileNotFoundError(
            f"{folder} has no normalization stats ({STATS_FILE}, or LeRobot's policy_preprocessor.json with its "
            "normalizer state): actions cannot be mapped back to robot units. Use the checkpoint folder written by "
            "training (it holds the dataset's stats) or copy the file from it."
        )
    return stats


def image_to_tensor(image: Any, key: str) -> Tensor:
    """One camera frame as a (3, H, W) float tensor in [0, 1], from uint8 HWC/CHW arrays, float tensors, PIL."""
    if hasattr(image, "convert") and not isinstance(image, (np.ndarray, Tensor)):  # PIL image
        image = np.asarray(image.convert("RGB"))
    t = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image)
    if t.ndim != 3:
        raise ObservationError(f"{key!r}: expected one image (H, W, 3) or (3, H, W), got shape {tuple(t.shape)}")
    if t.shape[0] != 3 and t.shape[-1] == 3:  # channels last, as cameras and datasets give them
        t = t.permute(2, 0, 1)
    if t.shape[0] != 3:
        raise ObservationError(f"{key!r}: expected 3 color channels, got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.float().div_(255)
    return t.float()


class Predictor:
    """A policy and its processor: observation(s) in, action chunk(s) out in the dataset's (robot's) units."""

    def __init__(self, policy: nn.Module, processor: PolicyProcessor, device: torch.device | str = "cpu",
                 source: str = ""):
        self.policy = policy.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.source = source

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, base: str | None = None, *, device: str | None = None,
                        dtype: str = "float32", num_steps: int | None = None, tokenizer_path: str | None = None,
                        use_trained_weights: bool = True, use_ema: bool | None = None) -> Predictor:
        """Load an adapter checkpoint (on its base: `base`, or the one in its train_config.json) or a full policy
        folder (a merged export, a FULL run's checkpoint, a LeRobot policy folder with stats).

        `use_trained_weights=False` gives the run's starting point instead: the base's weights with the checkpoint's
        config and normalization stats (the policy at step 0, the "before" of a fine-tune). `use_ema`: the checkpoint's
        EMA weights (ema/) when it has them (None, the default), always (True), never (False).
        """
        # a run still training may save and prune meanwhile: read one step folder, kept until loaded
        with reading_checkpoint(resolve_repo(str(checkpoint), "model", "checkpoint")) as folder:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            train_cfg = read_train_config(folder)
            stats = load_normalization_stats(folder)
            policy, tokenizer_dir = load_trained_policy(folder, base, torch.device(device), DTYPES[dtype],
                                                        use_trained_weights, use_ema)
            config = policy.config
            if num_steps is not None:
                config.num_steps = num_steps
            tokenizer_path = tokenizer_path or (train_cfg.policy.tokenizer_path if train_cfg else None)
            tokenizer = load_tokenizer(tokenizer_dir, tokenizer_path, config.tokenizer_name)
            rename_map = train_cfg.dataset.rename_map if train_cfg is not None else {}
            stats = {rename_map.get(k, k): v for k, v in stats.items()}
            processor = PolicyProcessor(config, tokenizer, stats, rename_map)
        return cls(policy, processor, device, source=str(folder))

    @property
    def config(self) -> PolicyConfig:
        return self.processor.config

    @property
    def cameras(self) -> list[str]:
        return self.config.image_features

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def action_dim(self) -> int:
        return self.config.action_dim

    def check_observation(self, observation: Mapping[str, Any]) -> dict[str, Any]:
        """The observation under the policy's names, checked: cameras, state size, instruction."""
        obs = {self.processor.rename_map.get(k, k): v for k, v in observation.items()}
        missing = [k for k in self.cameras if k not in obs]
        if len(missing) > getattr(self.config, "empty_cameras", 0):
            raise ObservationError(f"the observation has no camera {missing}: the policy was trained on cameras "
                                   f"{self.cameras}; the observation has {sorted(observation)}")
        if OBS_STATE not in obs:
            raise ObservationError(f"the observation has no {OBS_STATE!r} (the robot state, {self.config.state_dim} "
                                   f"values); it has {sorted(observation)}")
        state = torch.as_tensor(np.asarray(obs[OBS_STATE], dtype=np.float32)).reshape(-1)
        if state.numel() != self.config.state_dim:
            raise ObservationError(f"{OBS_STATE!r} has {state.numel()} values, the policy was trained on "
                                   f"{self.config.state_dim}")
        task = obs.get(TASK)
        if not isinstance(task, str):
            raise ObservationError(f"the observation needs {TASK!r}: the instruction as a string (got {task!r})")
        out = {key: image_to_tensor(obs[key], key) for key in self.cameras if key in obs}
        out[OBS_STATE] = state
        out[TASK] = task
        return out

    def batch(self, observations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Policy inputs for a list of observations: stacked, normalized, tokenized, on the device."""
        checked = [self.check_observation(o) for o in observations]
        batch: dict[str, Any] = {k: torch.stack([c[k] for c in checked]) for k in checked[0] if k != TASK}
        batch[TASK] = [c[TASK] for c in checked]
        batch = self.processor.prepare(batch)
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def noise(self, batch_size: int, generator: torch.Generator | None) -> Tensor | None:
        if generator is None:
            return None
        shape = (batch_size, self.config.chunk_size, self.config.max_action_dim)
        return torch.randn(shape, generator=generator).to(self.device)

    @torch.no_grad()
    def predict_batch(self, observations: Sequence[Mapping[str, Any]],
                      generator: torch.Generator | None = None) -> np.ndarray:
        """(B, chunk_size, action_dim) actions in robot units for B observations."""
        batch = self.batch(observations)
        normalized = self.policy.predict_action_chunk(batch, noise=self.noise(len(observations), generator))
        state = batch.get(RAW_STATE)  # relative-action policies: add the state back
        return self.processor.unnormalize_actions(normalized.float().cpu(),
                                                  None if state is None else state.cpu()).numpy()

    def __call__(self, observation: Mapping[str, Any], generator: torch.Generator | None = None) -> np.ndarray:
        """(chunk_size, action_dim) actions in robot units for one observation."""
        return self.predict_batch([observation], generator)[0]


# --- CLI: predictions on dataset frames -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictConfig:
    checkpoint: str
    """Adapter checkpoint (output_dir/checkpoints/last) or a merged / full policy folder."""
    dataset_root: str
    """LeRobotDataset v3.0 folder to take frames from."""
    base: str | None = None
    """Base policy for an adapter checkpoint; default: the one in its train_config.json."""
    episode: int | None = None
    """Episode to predict on; default: the dataset's last one (held out by default in training)."""
    frames: tuple[int, ...] = (0,)
    """Frame indices within the episode."""
    output: str | None = None
    """Write the predictions (and the recorded actions) to this .json or .npz file."""
    seed: int = 0
    """Seed of the sampling noise."""
    num_steps: int | None = None
    """Denoising steps (default: the policy's)."""
    device: str | None = None
    use_ema: bool | None = None
    """Use the checkpoint's EMA weights (ema/): default when it has them; False for the last trained weights."""


def predict_on_dataset(cfg: PredictConfig) -> dict[str, np.ndarray]:
    from finetune.data import LeRobotDataset, load_dataset_meta

    predictor = Predictor.from_checkpoint(cfg.checkpoint, cfg.base, device=cfg.device, num_steps=cfg.num_steps,
                                          use_ema=cfg.use_ema)
    meta = load_dataset_meta(cfg.dataset_root)
    episode = cfg.episode if cfg.episode is not None else meta.episodes[-1]["episode_index"]
    dataset = LeRobotDataset(cfg.dataset_root, predictor.chunk_size, episodes=[episode])
    if any(not 0 <= f < len(dataset) for f in cfg.frames):
        raise ValueError(f"--frames {cfg.frames}: episode {episode} has frames 0..{len(dataset) - 1}")
    samples = [dataset[f] for f in cfg.frames]
    predicted = predictor.predict_batch(samples, torch.Generator().manual_seed(cfg.seed))
    recorded = np.stack([s["action"].numpy() for s in samples])
    valid = np.stack([~s["action_is_pad"].numpy() for s in samples])
    for f, p, r, v in zip(cfg.frames, predicted, recorded, valid):
        mse = float(((p - r) ** 2)[v].mean())
        print(f"episode {episode} frame {f}: first action {np.round(p[0], 4).tolist()} (recorded "
              f"{np.round(r[0], 4).tolist()}); chunk MSE {mse:.6f}")
    result = {"predicted": predicted, "recorded": recorded, "action_is_pad": ~valid,
              "frames": np.asarray(cfg.frames), "episode": np.asarray(episode)}
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npz":
            np.savez(out, **result)
        else:
            out.write_text(json.dumps({k: v.tolist() for k, v in result.items()}, indent=1) + "\n")
        print(f"predictions written to {out}")
    return result


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
    cfg = tyro.cli(PredictConfig, args=argv, description="Predict action chunks on dataset frames.")
    with exit_on(ValueError, FileNotFoundError):
        return predict_on_dataset(cfg)


cli = console_script(main)


if __name__ == "__main__":
    main()
