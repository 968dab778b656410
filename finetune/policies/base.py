"""What every policy shares: the LeRobot-style config base, the batch keys, and the flow-matching policy and model
bases that SmolVLA, pi0 and pi0.5 build on (each names only its own modules and embeddings)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finetune.policies.common import (
    check_attn_implementation,
    euler_sample,
    flow_matching_targets,
    make_att_2d_masks,
    masked_action_loss,
    pad_last_dim,
    sample_flow_time,
    set_vision_attn_implementation,
)

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
    # Fields of LeRobot main that LeRobot 0.6.x does not have: written to config.json only when not at their default.
    newer_than_lerobot_0_6: ClassVar[tuple[str, ...]] = ()

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
            if f.name in self.newer_than_lerobot_0_6 and value == f.default:
                continue  # LeRobot 0.6.x refuses a config.json with fields it does not know; the default is implied
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


class FlowMatchingModel(nn.Module):
    """A policy's `model`: the flow-matching loss and Euler sampling around a joint VLM + action expert transformer.

    SmolVLA, pi0 and pi0.5 differ only in how they embed the prefix (images, text, maybe the state) and the suffix
    (the noisy actions, maybe the state) and in the action head, so subclasses provide `joint` (the transformer run
    over [prefix, suffix] with LeRobot's signature), `_prefix`, `_suffix` and, when it differs, `_velocity`.
    """

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config

    @property
    def joint(self) -> nn.Module:
        """The VLM and action expert run layer by layer (LeRobot's vlm_with_expert / paligemma_with_expert)."""
        raise NotImplementedError

    def _prefix(self, images, img_masks, lang_tokens, lang_masks, state) -> tuple[Tensor, Tensor, Tensor]:
        """Prefix embeddings, pad mask and block flags (see make_att_2d_masks)."""
        raise NotImplementedError

    def _suffix(self, state: Tensor, noisy_actions: Tensor, time: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        """Suffix embeddings as the expert takes them, pad mask, block flags, and extra keyword arguments of `joint`."""
        raise NotImplementedError

    def _velocity(self, suffix_out: Tensor) -> Tensor:
        """The predicted velocity: action_out_proj on the chunk's suffix outputs, in float32."""
        return self.action_out_proj(suffix_out[:, -self.config.chunk_size :].float())

    def forward(self, images, img_masks, lang_tokens, lang_masks, state, actions, noise=None, time=None) -> Tensor:
        """Per-element flow-matching loss, shape (B, chunk_size, max_action_dim)."""
        if noise is None:
            noise = torch.randn(actions.shape, dtype=torch.float32, device=actions.device)
        if time is None:
            time = sample_flow_time(actions.shape[0], actions.device)
        x_t, u_t = flow_matching_targets(actions, noise, time)
        prefix = self._prefix(images, img_masks, lang_tokens, lang_masks, state)
        return F.mse_loss(u_t, self._denoise_full(state, *prefix, x_t, time), reduction="none")

    def _sample(self, images, img_masks, lang_tokens, lang_masks, state, noise: Tensor | None,
                use_cache: bool) -> Tensor:
        """Euler-integrate the flow from noise. With `use_cache` the prefix goes through the VLM once, into a KV cache
        (as LeRobot); without, every step recomputes the whole sequence. Subclasses' sample_actions call this."""
        if noise is None:
            shape = (state.shape[0], self.config.chunk_size, self.config.max_action_dim)
            noise = torch.randn(shape, dtype=torch.float32, device=state.device)
        prefix, prefix_pad, prefix_att = self._prefix(images, img_masks, lang_tokens, lang_masks, state)
        if use_cache:
            prefix_2d = make_att_2d_masks(prefix_pad, prefix_att)
            _, kv_cache = self.joint(prefix_2d, torch.cumsum(prefix_pad, dim=1) - 1, [prefix, None], fill_kv_cache=True)
            denoise = partial(self._denoise_cached, state, prefix_pad, kv_cache)
        else:
            denoise = partial(self._denoise_full, state, prefix, prefix_pad, prefix_att)
        return euler_sample(denoise, noise, self.config.num_steps)

    def _denoise_cached(self, state, prefix_pad, kv_cache, x_t, time) -> Tensor:
        """The velocity at (x_t, time), the suffix attending to the cached prefix keys/values and to itself."""
        suffix, suffix_pad, suffix_att, joint_kwargs = self._suffix(state, x_t, time)
        batch, suffix_len = suffix_pad.shape
        prefix_2d = prefix_pad[:, None, :].expand(batch, suffix_len, prefix_pad.shape[1])
        mask = torch.cat([prefix_2d, make_att_2d_masks(suffix_pad, suffix_att)], dim=2)
        position_ids = prefix_pad.sum(dim=-1)[:, None] + torch.cumsum(suffix_pad, dim=1) - 1
        (_, suffix_out), _ = self.joint(mask, position_ids, [None, suffix], kv_cache=kv_cache, **joint_kwargs)
        return self._velocity(suffix_out)

    def _denoise_full(self, state, prefix, prefix_pad, prefix_att, x_t, time) -> Tensor:
        """The velocity at (x_t, time) from one pass over prefix and suffix (the training forward's too).

        When gradients flow but the VLM trains nothing, the prefix's frozen context (the tokens before its first block
        flag: images and text) is encoded first without autograd, into a KV cache, and the rest of the prefix and the
        suffix attend to it, as sampling does. The joint pass would get the same numbers but record every VLM layer
        over the whole context and run its backward, which changes no gradient: no trained weight is upstream and the
        context tokens see no later token.
        """
        suffix, suffix_pad, suffix_att, joint_kwargs = self._suffix(state, x_t, time)
        pad_masks = torch.cat([prefix_pad, suffix_pad], dim=1)
        att_2d = make_att_2d_masks(pad_masks, torch.cat([prefix_att, suffix_att], dim=1))
        position_ids = torch.cumsum(pad_masks, dim=1) - 1
        context = self._frozen_context_length(prefix_att)
        if not context:
            (_, suffix_out), _ = self.joint(att_2d, position_ids, [prefix, suffix], **joint_kwargs)
            return self._velocity(suffix_out)
        with torch.no_grad():
            _, kv_cache = self.joint(att_2d[:, :context, :context], position_ids[:, :context],
                                     [prefix[:, :context], None], fill_kv_cache=True)
        rest = prefix[:, context:] if context < prefix.shape[1] else None
        (_, suffix_out), _ = self.joint(att_2d[:, context:], position_ids[:, context:], [rest, suffix],
                                        kv_cache=kv_cache, **joint_kwargs)
        return self._velocity(suffix_out)

    @torch.compiler.disable  # a Python-level decision over the parameters: no graph to trace
    def _frozen_context_length(self, prefix_att: Tensor) -> int:
        """How many leading prefix tokens can be encoded without autograd: those before the first block flag (they see
        no later token) when gradients are on and no VLM parameter trains; 0 otherwise (the joint pass then runs)."""
        if not torch.is_grad_enabled() or any(p.requires_grad for p in self.joint.vlm_parameters()):
            return 0
        opens = prefix_att.any(dim=0).tolist()
        return opens.index(True) if True in opens else len(opens)


class FlowMatchingPolicy(nn.Module):
    """What every policy shares: camera selection, state/action padding, loss reduction, sampling, LeRobot's freezing
    rules and the attention/checkpointing switches of the joint transformer.

    Subclasses set `config` and `model` (a FlowMatchingModel), call `_finish_init()` at the end of `__init__`, name
    their VLM parts (`_vlm`, `_vision_tower`, `_text_model`) and define
    `prepare_image(batch, key, image) -> (image in [-1, 1] at the model's size, (B,) bool mask)`.
    """

    config: PolicyConfig
    model: FlowMatchingModel
    # Modules kept in eval mode while training because a FULL run freezes them (set by set_full_training_grads).
    _frozen_modules: tuple[nn.Module, ...] = ()

    def _finish_init(self) -> None:
        """LeRobot's settings for what the weights do not hold: activation checkpointing from the config (pi0 has the
        field, SmolVLA none: off), sdpa attention, and compile_model."""
        self.set_gradient_checkpointing(getattr(self.config, "gradient_checkpointing", False))
        self.set_attn_implementation("sdpa")
        self.compile_if_configured()

    # --- the VLM parts each policy names --------------------------------------------------------------------------
    def _vlm(self) -> nn.Module:
        """The whole VLM (train_expert_only freezes it)."""
        raise NotImplementedError

    def _vision_tower(self) -> nn.Module:
        """The VLM's vision encoder, without the projector (freeze_vision_encoder freezes it)."""
        raise NotImplementedError

    def _text_model(self) -> nn.Module:
        """The VLM's text tower, whose token embeddings feed the joint layers."""
        raise NotImplementedError

    # --- training switches ----------------------------------------------------------------------------------------
    def frozen_in_full_training(self) -> list[nn.Module]:
        """Modules a FULL fine-tune leaves frozen, by LeRobot's rules: freeze_vision_encoder freezes the vision
        encoder (not the projector), train_expert_only the whole VLM."""
        frozen: list[nn.Module] = []
        if self.config.freeze_vision_encoder:
            frozen.append(self._vision_tower())
        if self.config.train_expert_only:
            frozen.append(self._vlm())
        return frozen

    def set_attn_implementation(self, name: str, vision: str | None = None) -> None:
        """`sdpa` (torch's fused attention, the default) or `eager` in the joint layers; the vision tower takes
        `vision` (default: the same)."""
        self.model.joint.attn_implementation = check_attn_implementation(name)
        set_vision_attn_implementation(self._vision_tower(), check_attn_implementation(vision or name))

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each joint decoder layer (both towers) in the backward pass."""
        self.model.joint.gradient_checkpointing = enabled

    def input_embeddings_module(self) -> nn.Module:
        """Where inputs enter the checkpointed layers (k-bit training makes its output require grad)."""
        return self._text_model().get_input_embeddings()

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
        """LeRobot's compile_model from the config (with its compile_mode)."""
        if getattr(self.config, "compile_model", False):
            self.compile_forward(getattr(self.config, "compile_mode", None))

    def compile_forward(self, mode: str | None = None) -> None:
        """torch.compile the flow-matching model's forward and sampling, as LeRobot's compile_model does; parameter
        names and state dicts stay those of the eager model. Once per policy."""
        if getattr(self.model.forward, "_torchdynamo_orig_callable", None) is not None:
            return
        torch.set_float32_matmul_precision("high")
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

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """Normalized action chunk (B, chunk_size, action_dim)."""
        return self._action_chunk(batch, noise=noise)

    def _action_chunk(self, batch: dict[str, Tensor], **sample_kwargs: Any) -> Tensor:
        """The model's sampled actions cut to the real action dims (sample_kwargs: what its sample_actions takes)."""
        actions = self.model.sample_actions(*self._inputs(batch), **sample_kwargs)
        return actions[:, :, : self.config.action_dim]
