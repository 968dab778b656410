"""What every policy shares: the LeRobot-style config base and the batch keys."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .common import masked_action_loss, pad_last_dim

OBS_STATE = "observation.state"
OBS_IMAGES_PREFIX = "observation.images."
ACTION = "action"
ACTION_IS_PAD = "action_is_pad"
TASK = "task"
LANG_TOKENS = "observation.language.tokens"
LANG_MASK = "observation.language.attention_mask"


@dataclass
class PolicyConfig:
    """Fields shared by LeRobot's policy configs; subclasses add their own.

    `config.json` written by `to_dict` uses LeRobot's field names and `"type"`, so LeRobot can read it and we can read
    LeRobot's. Fields this project does not know are kept in `extra` and written back unchanged.
    """

    type: ClassVar[str] = ""

    n_obs_steps: int = 1
    input_features: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_features: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str | None = None
    use_amp: bool = False
    push_to_hub: bool = False
    repo_id: str | None = None
    private: bool | None = None
    tags: list[str] | None = None
    license: str | None = None
    pretrained_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # --- features -------------------------------------------------------------------------------------------------
    @property
    def image_features(self) -> list[str]:
        return [k for k, f in self.input_features.items() if f["type"] == "VISUAL"]

    @property
    def state_dim(self) -> int:
        return int(self.input_features["observation.state"]["shape"][0])

    @property
    def action_dim(self) -> int:
        return int(self.output_features["action"]["shape"][0])

    # --- text input -----------------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str | None:
        """Hub id of the tokenizer LeRobot loads for this policy: the fallback when no local tokenizer is given."""
        return getattr(self, "vlm_model_name", None)

    def build_prompts(self, tasks: list[str], state: Any | None = None) -> list[str]:
        """The text the tokenizer sees, one per sample, from the task strings and the normalized state.

        LeRobot's SmolVLA and pi0 processors end every task with a newline; a policy with another rule overrides this
        (pi0.5 writes the discretized state into the prompt).
        """
        return [t if t.endswith("\n") else f"{t}\n" for t in tasks]

    # --- serialization --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        data = dict(data)
        found_type = data.pop("type", cls.type)
        if found_type != cls.type:
            raise ValueError(f"config has policy type {found_type!r}, expected {cls.type!r}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs, extra = {}, dict(data.pop("extra", {}))
        for key, value in data.items():
            if key not in known:
                extra[key] = value
            elif isinstance(known[key].default, tuple) and isinstance(value, list):
                kwargs[key] = tuple(value)
            else:
                kwargs[key] = value
        return cls(**kwargs, extra=extra)

    def save(self, folder: str | Path) -> None:
        Path(folder, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


class FlowMatchingPolicy(nn.Module):
    """The batch-level front end every policy shares: camera selection, state/action padding, loss reduction.

    Subclasses set `config` and `model` (whose forward gives per-element flow-matching losses) and define
    `prepare_image(batch, key, image) -> (image in [-1, 1] at the model's size, (B,) bool mask)`.
    """

    config: PolicyConfig
    model: nn.Module
    # Modules kept in eval mode while training because a FULL run freezes them (set by set_full_training_grads).
    _frozen_modules: tuple[nn.Module, ...] = ()

    def frozen_in_full_training(self) -> list[nn.Module]:
        """Modules a FULL fine-tune leaves frozen (LeRobot's freeze_vision_encoder / train_expert_only rules)."""
        return []

    def set_full_training_grads(self) -> list[str]:
        """A FULL fine-tune as LeRobot's: every parameter trains except those the config's freeze_vision_encoder and
        train_expert_only freeze (kept in eval mode, as LeRobot's train() override does). Returns the frozen names."""
        frozen = self.frozen_in_full_training()
        frozen_ids = {id(p) for module in frozen for p in module.parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) not in frozen_ids)
        self._frozen_modules = tuple(frozen)
        self.train(self.training)
        return [n for n, p in self.named_parameters() if not p.requires_grad]

    def train(self, mode: bool = True) -> FlowMatchingPolicy:
        super().train(mode)
        for module in self._frozen_modules:
            module.eval()
        return self

    def compile_if_configured(self) -> None:
        """LeRobot's compile_model: torch.compile the flow-matching model's forward and sampling (compile_mode)."""
        if not getattr(self.config, "compile_model", False):
            return
        torch.set_float32_matmul_precision("high")
        mode = getattr(self.config, "compile_mode", None)
        self.model.forward = torch.compile(self.model.forward, mode=mode)
        self.model.sample_actions = torch.compile(self.model.sample_actions, mode=mode)

    def prepare_images(self, batch: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The policy's cameras in config order; missing ones (up to empty_cameras) become -1 images, mask False."""
        cameras = self.config.image_features
        present = [key for key in cameras if key in batch]
        missing = [key for key in cameras if key not in batch]
        if not present:
            raise ValueError(f"the batch has none of the policy's cameras {cameras}; it has {sorted(batch)}. Map the "
                             "dataset's camera keys with --dataset.rename-map.")
        if len(missing) > getattr(self.config, "empty_cameras", 0):
            raise ValueError(f"cameras {missing} are missing from the batch and the policy allows only "
                             f"{getattr(self.config, 'empty_cameras', 0)} empty camera(s); map them with "
                             "--dataset.rename-map")
        images, masks = [], []
        for key in present:
            image = batch[key][:, -1] if batch[key].ndim == 5 else batch[key]  # last observation step
            image, mask = self.prepare_image(batch, key, image)
            images.append(image)
            masks.append(mask)
        for _ in missing:
            images.append(torch.full_like(images[0], -1.0))
            masks.append(torch.zeros_like(masks[0]))
        return images, masks

    def _inputs(self, batch: dict[str, Tensor]) -> tuple:
        images, img_masks = self.prepare_images(batch)
        state = pad_last_dim(batch[OBS_STATE], self.config.max_state_dim)
        return images, img_masks, batch[LANG_TOKENS], batch[LANG_MASK], state

    def forward(self, batch: dict[str, Tensor], noise: Tensor | None = None,
                time: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Flow-matching loss over the real action dims and in-episode chunk steps."""
        actions = pad_last_dim(batch[ACTION], self.config.max_action_dim)
        losses = self.model(*self._inputs(batch), actions, noise, time)
        loss = masked_action_loss(losses, batch[ACTION].shape[-1], batch.get(ACTION_IS_PAD))
        return loss, {"loss": loss.detach().item()}
