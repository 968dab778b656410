"""SmolVLA on transformers' SmolVLM, with LeRobot's module names, state-dict keys and config fields.

`SmolVLAPolicy.model` is LeRobot's `VLAFlowMatching`: a SmolVLM backbone (truncated to `num_vlm_layers`) and a
narrower Llama "action expert" run layer by layer side by side. Even layers attend jointly over both towers; odd
layers (attention_mode "cross_attn") let the prefix attend to itself while the expert's queries attend to the VLM's
keys/values re-projected by the expert's own k/v projections. The math mirrors LeRobot's modeling_smolvla.py so that
a LeRobot checkpoint gives the same loss and actions here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, SmolVLMConfig, SmolVLMForConditionalGeneration

from finetune.policies.base import FlowMatchingModel, FlowMatchingPolicy, PolicyConfig
from finetune.policies.common import compute_dtype, resize_with_pad, sdpa_attention, sinusoidal_time_embedding

SMOLVLM2_500M = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"

# Architectures known without the Hub (LeRobot fetches these with AutoConfig.from_pretrained, which needs a network).
KNOWN_VLM_CONFIGS: dict[str, dict[str, Any]] = {
    SMOLVLM2_500M: {
        "scale_factor": 4,
        "image_token_id": 49190,
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "llama",
            "hidden_size": 960,
            "intermediate_size": 2560,
            "num_hidden_layers": 32,
            "num_attention_heads": 15,
            "num_key_value_heads": 5,
            "head_dim": 64,
            "vocab_size": 49280,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "pad_token_id": 2,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 512,
            "patch_size": 16,
            "num_channels": 3,
        },
    },
}


@dataclass
class SmolVLAConfig(PolicyConfig):
    """LeRobot's SmolVLAConfig fields (same names and defaults)."""

    type: ClassVar[str] = "smolvla"

    chunk_size: int = 50
    n_action_steps: int = 50
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    max_state_dim: int = 32
    max_action_dim: int = 32
    resize_imgs_with_padding: tuple[int, int] = (512, 512)
    empty_cameras: int = 0
    adapt_to_pi_aloha: bool = False
    use_delta_joint_actions_aloha: bool = False
    tokenizer_max_length: int = 48
    num_steps: int = 10
    use_cache: bool = True
    freeze_vision_encoder: bool = True
    train_expert_only: bool = True
    train_state_proj: bool = True
    optimizer_lr: float = 1e-4
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 1e-10
    optimizer_grad_clip_norm: float = 10.0
    scheduler_warmup_steps: int = 1_000
    scheduler_decay_steps: int = 30_000
    scheduler_decay_lr: float = 2.5e-6
    vlm_model_name: str = SMOLVLM2_500M
    load_vlm_weights: bool = False
    add_image_special_tokens: bool = False
    attention_mode: str = "cross_attn"
    prefix_length: int = -1
    pad_language_to: str = "longest"
    num_expert_layers: int = -1
    num_vlm_layers: int = 16
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.75
    min_period: float = 4e-3
    max_period: float = 4.0
    compile_model: bool = False
    compile_mode: str = "max-autotune"


def expert_intermediate_size(hidden: int, ffn_multiplier: int = 4, multiple_of: int = 256) -> int:
    """LeRobot's rule for the expert MLP width: 4 * (2/3 * hidden), rounded up to a multiple of 256."""
    size = int(ffn_multiplier * int(2 * hidden / 3))
    return multiple_of * ((size + multiple_of - 1) // multiple_of)


def make_vlm_config(vlm_model_name: str, vlm_config: dict[str, Any] | None = None) -> SmolVLMConfig:
    """SmolVLM config from an explicit dict (tiny/test models), the built-in table of known architectures, or a local
    VLM folder named by `vlm_model_name` (as LeRobot reads it; e.g. an export's vlm/)."""
    spec = vlm_config if vlm_config is not None else KNOWN_VLM_CONFIGS.get(vlm_model_name)
    if spec is None and Path(vlm_model_name, "config.json").is_file():
        return SmolVLMConfig.from_pretrained(vlm_model_name)
    if spec is None:
        raise ValueError(
            f"unknown VLM architecture {vlm_model_name!r}: known offline are {sorted(KNOWN_VLM_CONFIGS)}. "
            "Put its SmolVLM config in the policy folder as vlm_config.json."
        )
    return SmolVLMConfig(**copy.deepcopy(spec))


def apply_rope(x: Tensor, positions: Tensor, max_wavelength: float = 10_000) -> Tensor:
    """SmolVLA's rotary embedding on (B, L, H, D), halves rotated (not interleaved), computed in float32."""
    d_half = x.shape[-1] // 2
    dtype = x.dtype
    x = x.float()
    exponents = (2.0 / x.shape[-1]) * torch.arange(d_half, dtype=torch.float32, device=x.device)
    timescale = max_wavelength**exponents
    radians = (positions[..., None].float() / timescale[None, None, :])[..., None, :]
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = x.split(d_half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)


def eager_attention(mask: Tensor, query: Tensor, key: Tensor, value: Tensor, num_heads: int) -> Tensor:
    """Grouped-KV attention in float32 on (B, L, H, D) tensors; masked scores get the dtype's minimum."""
    batch, _, kv_heads, head_dim = key.shape
    groups = num_heads // kv_heads
    key = key.repeat_interleave(groups, dim=2)
    value = value.repeat_interleave(groups, dim=2)
    scores = torch.matmul(query.float().transpose(1, 2), key.float().permute(0, 2, 3, 1)) * head_dim**-0.5
    scores = torch.where(mask[:, None], scores, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value.transpose(1, 2)).transpose(1, 2)
    return out.reshape(batch, -1, num_heads * head_dim)


def _project_qkv(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Input norm and q/k/v projections of one decoder layer, each reshaped to (B, L, heads, head_dim)."""
    attn = layer.self_attn
    hidden = layer.input_layernorm(hidden)
    hidden = hidden.to(compute_dtype(attn.q_proj, hidden))
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    return attn.q_proj(hidden).view(shape), attn.k_proj(hidden).view(shape), attn.v_proj(hidden).view(shape)


class SmolVLMWithExpertModel(nn.Module):
    """LeRobot's `vlm_with_expert`: the SmolVLM (`vlm`) and the action expert (`lm_expert`) run jointly."""

    def __init__(self, config: SmolVLAConfig, vlm_config: SmolVLMConfig):
        super().__init__()
        self.vlm = SmolVLMForConditionalGeneration(vlm_config)
        text_model = self.vlm.model.text_model
        if config.num_vlm_layers > 0:
            text_model.layers = text_model.layers[: config.num_vlm_layers]
        self.num_vlm_layers = len(text_model.layers)

        text_cfg = vlm_config.text_config
        expert_cfg = copy.deepcopy(text_cfg)
        expert_cfg.hidden_size = int(text_cfg.hidden_size * config.expert_width_multiplier)
        expert_cfg.intermediate_size = expert_intermediate_size(expert_cfg.hidden_size)
        expert_cfg.num_hidden_layers = self.num_vlm_layers
        if config.num_expert_layers > 0:
            if self.num_vlm_layers % config.num_expert_layers:
                raise ValueError(
                    f"num_vlm_layers ({self.num_vlm_layers}) must be a multiple of num_expert_layers "
                    f"({config.num_expert_layers})"
                )
            expert_cfg.num_hidden_layers = config.num_expert_layers
        self.lm_expert = AutoModel.from_config(expert_cfg)
        self.num_expert_layers = len(self.lm_expert.layers)

        # In cross-attention layers the expert re-projects the VLM's keys/values, so its k/v take the VLM's KV width.
        self.attention_mode = config.attention_mode
        self.self_attn_every_n_layers = config.self_attn_every_n_layers
        vlm_kv_width = text_cfg.num_key_value_heads * text_cfg.head_dim
        expert_kv_width = expert_cfg.num_key_value_heads * expert_cfg.head_dim
        if "cross" in self.attention_mode:
            for idx, layer in enumerate(self.lm_expert.layers):
                if not self._is_self_attn_layer(idx):
                    layer.self_attn.k_proj = nn.Linear(vlm_kv_width, expert_kv_width, bias=expert_cfg.attention_bias)
                    layer.self_attn.v_proj = nn.Linear(vlm_kv_width, expert_kv_width, bias=expert_cfg.attention_bias)
        self.lm_expert.embed_tokens = None

        self.num_attention_heads = text_cfg.num_attention_heads
        self.head_dim = text_cfg.head_dim
        self.expert_hidden_size = expert_cfg.hidden_size
        self.gradient_checkpointing = False
        self.attn_implementation = "sdpa"  # or "eager": LeRobot's explicit float32 softmax (same numbers in fp32)

    def attend(self, mask: Tensor, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Grouped-KV attention on (B, L, H, D) tensors under a (B, Q, K) boolean mask -> (B, Q, H * D)."""
        if self.attn_implementation == "eager":
            return eager_attention(mask, query, key, value, self.num_attention_heads)
        out = sdpa_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask,
                             self.head_dim**-0.5)
        return out.transpose(1, 2).reshape(*query.shape[:2], -1)

    def _is_self_attn_layer(self, idx: int) -> bool:
        every = self.self_attn_every_n_layers
        return "cross" not in self.attention_mode or (every > 0 and idx % every == 0)

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.model.text_model

    def expert_layer(self, idx: int) -> nn.Module | None:
        """The expert layer paired with VLM layer `idx` (None when the expert is shallower and skips it)."""
        every = self.num_vlm_layers // self.num_expert_layers
        if every > 1 and idx % every != 0:
            return None
        return self.lm_expert.layers[idx // every]

    def vlm_parameters(self) -> Iterator[nn.Parameter]:
        """Everything that computes the prefix's images and text (vision tower, connector, embeddings, text layers)."""
        return self.vlm.parameters()

    def embed_image(self, image: Tensor) -> Tensor:
        vision = self.vlm.model.vision_model
        hidden = vision(pixel_values=image.to(vision.embeddings.patch_embedding.weight.dtype)).last_hidden_state
        return self.vlm.model.connector(hidden)

    def embed_language_tokens(self, tokens: Tensor) -> Tensor:
        return self.text_model.get_input_embeddings()(tokens)

    # --- joint forward --------------------------------------------------------------------------------------------
    def forward(
        self,
        attention_mask: Tensor,
        position_ids: Tensor,
        inputs_embeds: list[Tensor | None],
        kv_cache: dict[int, tuple[Tensor, Tensor]] | None = None,
        fill_kv_cache: bool = False,
    ) -> tuple[list[Tensor | None], dict[int, tuple[Tensor, Tensor]] | None]:
        """Run both towers layer by layer.

        inputs_embeds is [prefix, suffix]; either may be None. With `fill_kv_cache` every layer self-attends over the
        prefix and stores its post-RoPE keys/values; with a filled `kv_cache` the suffix attends to those.
        """
        if fill_kv_cache:
            kv_cache = {}
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for idx in range(self.num_vlm_layers):
            if use_checkpoint:
                inputs_embeds = checkpoint(
                    self._layer, idx, inputs_embeds, attention_mask, position_ids, kv_cache, fill_kv_cache,
                    use_reentrant=False,
                )
            else:
                inputs_embeds = self._layer(idx, inputs_embeds, attention_mask, position_ids, kv_cache, fill_kv_cache)
        models = [self.text_model, self.lm_expert]
        outputs = [None if h is None else models[i].norm(h) for i, h in enumerate(inputs_embeds)]
        return outputs, kv_cache

    def _layer(self, idx, inputs_embeds, attention_mask, position_ids, kv_cache, fill_kv_cache):
        layers = [self.text_model.layers[idx], self.expert_layer(idx)]
        if fill_kv_cache or self._is_self_attn_layer(idx):
            att_outputs = self._self_attention(idx, layers, inputs_embeds, attention_mask, position_ids, kv_cache,
                                               fill_kv_cache)
        else:
            att_outputs = self._cross_attention(idx, layers, inputs_embeds, attention_mask, position_ids, kv_cache)

        outputs, start = [], 0
        for i, hidden in enumerate(inputs_embeds):
            layer = layers[i]
            if hidden is None or layer is None:
                outputs.append(hidden)
                continue
            # A joint (self-attention) layer returns one output for the concatenated sequence; slice our part.
            att = att_outputs[0] if len(att_outputs) == 1 else att_outputs[i]
            end = start + hidden.shape[1]
            att = att[:, start:end] if len(att_outputs) == 1 else att
            start = end if len(att_outputs) == 1 else 0
            att = att.to(compute_dtype(layer.self_attn.o_proj, att))
            out = layer.self_attn.o_proj(att) + hidden
            out = layer.mlp(layer.post_attention_layernorm(out)) + out
            outputs.append(out)
        return outputs

    def _self_attention(self, idx, layers, inputs_embeds, attention_mask, position_ids, kv_cache, fill_kv_cache):
        queries, keys, values = [], [], []
        for hidden, layer in zip(inputs_embeds, layers, strict=True):
            if hidden is None or layer is None:
                continue
            q, k, v = _project_qkv(layer, hidden)
            queries.append(q), keys.append(k), values.append(v)
        if not queries:  # only the suffix is running and the (shallower) expert skips this layer
            return [None]
        query, key, value = torch.cat(queries, 1), torch.cat(keys, 1), torch.cat(values, 1)
        seq_len = query.shape[1]
        if seq_len < position_ids.shape[1]:  # the expert is shallower than the VLM and skipped this layer
            cached = 0 if fill_kv_cache or kv_cache is None else kv_cache[idx][0].shape[1]
            position_ids, attention_mask = position_ids[:, :seq_len], attention_mask[:, :seq_len, : cached + seq_len]
        query, key = apply_rope(query, position_ids), apply_rope(key, position_ids)
        if fill_kv_cache:
            kv_cache[idx] = (key, value)
        elif kv_cache is not None:
            key = torch.cat([kv_cache[idx][0], key], dim=1)
            value = torch.cat([kv_cache[idx][1], value], dim=1)
        return [self.attend(attention_mask, query, key, value)]

    def _cross_attention(self, idx, layers, inputs_embeds, attention_mask, position_ids, kv_cache):
        vlm_layer, expert_layer = layers
        prefix, suffix = inputs_embeds
        att_outputs = []
        seq_len = 0 if prefix is None else prefix.shape[1]
        if prefix is not None:  # the prefix (or its part after a cached context) self-attends
            prefix_pos = position_ids[:, :seq_len]
            q, k, value = _project_qkv(vlm_layer, prefix)
            query, key = apply_rope(q, prefix_pos), apply_rope(k, prefix_pos)
            if kv_cache is not None:
                key, value = torch.cat([kv_cache[idx][0], key], dim=1), torch.cat([kv_cache[idx][1], value], dim=1)
            prefix_mask = attention_mask[:, :seq_len, : key.shape[1]]
            att_outputs.append(self.attend(prefix_mask, query, key, value))
        else:
            key, value = kv_cache[idx]
        expert_pos = position_ids[:, seq_len:]
        if expert_layer is None:
            return att_outputs + [None]

        attn = expert_layer.self_attn
        hidden = expert_layer.input_layernorm(suffix)
        hidden = hidden.to(compute_dtype(attn.q_proj, hidden))
        query = attn.q_proj(hidden).view(*hidden.shape[:-1], -1, attn.head_dim)
        flat_k = key.reshape(*key.shape[:2], -1).to(compute_dtype(attn.k_proj, key))
        flat_v = value.reshape(*value.shape[:2], -1).to(compute_dtype(attn.v_proj, value))
        expert_key = attn.k_proj(flat_k).view(*flat_k.shape[:-1], -1, attn.head_dim)
        expert_value = attn.v_proj(flat_v).view(*flat_v.shape[:-1], -1, attn.head_dim)
        expert_pos = expert_pos - expert_pos.min(dim=1, keepdim=True).values  # expert positions restart at 0
        query = apply_rope(query, expert_pos)
        expert_mask = attention_mask[:, -suffix.shape[1] :, : expert_key.shape[1]]
        att_outputs.append(self.attend(expert_mask, query, expert_key, expert_value))
        return att_outputs


class VLAFlowMatching(FlowMatchingModel):
    """LeRobot's `model`: prefix/suffix embedding, the joint transformer and the flow-matching head."""

    def __init__(self, config: SmolVLAConfig, vlm_config: SmolVLMConfig):
        super().__init__(config)
        self.vlm_with_expert = SmolVLMWithExpertModel(config, vlm_config)
        vlm_width = vlm_config.text_config.hidden_size
        expert_width = self.vlm_with_expert.expert_hidden_size
        self.state_proj = nn.Linear(config.max_state_dim, vlm_width)
        self.action_in_proj = nn.Linear(config.max_action_dim, expert_width)
        self.action_out_proj = nn.Linear(expert_width, config.max_action_dim)
        self.action_time_mlp_in = nn.Linear(expert_width * 2, expert_width)
        self.action_time_mlp_out = nn.Linear(expert_width, expert_width)
        # Token ids of <fake_token_around_image> and <global-img>; set from the tokenizer when the config asks for them.
        self.image_special_token_ids: tuple[int, int] | None = None

    @property
    def joint(self) -> SmolVLMWithExpertModel:
        return self.vlm_with_expert

    def embed_prefix(self, images, img_masks, lang_tokens, lang_masks, state) -> tuple[Tensor, Tensor, Tensor]:
        embs, pad_masks, att_flags = [], [], []
        vlm = self.vlm_with_expert
        batch = state.shape[0]

        def add_special(token_ids: list[int]) -> None:
            ids = torch.tensor(token_ids, dtype=torch.long, device=state.device)
            emb = vlm.embed_language_tokens(ids).unsqueeze(0).expand(batch, -1, -1)
            embs.append(emb)
            pad_masks.append(torch.ones(batch, len(token_ids), dtype=torch.bool, device=state.device))
            att_flags.extend([0] * len(token_ids))

        for img, img_mask in zip(images, img_masks, strict=True):
            if self.config.add_image_special_tokens:
                if self.image_special_token_ids is None:
                    raise ValueError("add_image_special_tokens needs the tokenizer's image token ids; load the "
                                     "policy with its tokenizer")
                add_special(list(self.image_special_token_ids))
            img_emb = vlm.embed_image(img)
            img_emb = img_emb * torch.tensor(img_emb.shape[-1] ** 0.5, dtype=img_emb.dtype, device=img_emb.device)
            embs.append(img_emb)
            pad_masks.append(img_mask[:, None].expand(batch, img_emb.shape[1]))
            att_flags.extend([0] * img_emb.shape[1])
            if self.config.add_image_special_tokens:
                add_special([self.image_special_token_ids[0]])

        lang_emb = vlm.embed_language_tokens(lang_tokens)
        embs.append(lang_emb * math.sqrt(lang_emb.shape[-1]))
        pad_masks.append(lang_masks.bool())
        att_flags.extend([0] * lang_emb.shape[1])

        state_emb = self.state_proj(state)
        state_emb = state_emb[:, None, :] if state_emb.ndim == 2 else state_emb
        embs.append(state_emb)
        pad_masks.append(torch.ones(batch, state_emb.shape[1], dtype=torch.bool, device=state.device))
        att_flags.extend([1] * state_emb.shape[1])  # the state opens a block: the images and text do not see it

        embs = torch.cat([e.to(embs[0].dtype) for e in embs], dim=1)
        pad_masks = torch.cat(pad_masks, dim=1)
        att = torch.tensor(att_flags, dtype=torch.bool, device=state.device)[None, :]
        if 0 < embs.shape[1] < self.config.prefix_length:
            extra = self.config.prefix_length - embs.shape[1]
            embs = F.pad(embs, (0, 0, 0, extra))
            pad_masks = F.pad(pad_masks, (0, extra))
            att = F.pad(att, (0, extra))
        return embs, pad_masks, att.expand(batch, -1)

    def embed_suffix(self, noisy_actions: Tensor, time: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        action_emb = self.action_in_proj(noisy_actions)
        width = self.vlm_with_expert.expert_hidden_size
        time_emb = sinusoidal_time_embedding(time, width, self.config.min_period, self.config.max_period)
        time_emb = time_emb.to(action_emb.dtype)[:, None, :].expand_as(action_emb)
        hidden = self.action_time_mlp_in(torch.cat([action_emb, time_emb], dim=2))
        hidden = self.action_time_mlp_out(F.silu(hidden))
        batch, length = hidden.shape[:2]
        pad_masks = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        att = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)  # actions attend causally
        return hidden, pad_masks, att

    def _prefix(self, images, img_masks, lang_tokens, lang_masks, state) -> tuple[Tensor, Tensor, Tensor]:
        return self.embed_prefix(images, img_masks, lang_tokens, lang_masks, state)  # the state is a prefix token

    def _suffix(self, state: Tensor, noisy_actions: Tensor, time: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        return *self.embed_suffix(noisy_actions, time), {}

    @torch.no_grad()
    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None) -> Tensor:
        """Euler-integrate the flow from noise; the prefix is encoded once into a KV cache when use_cache is set."""
        return self._sample(images, img_masks, lang_tokens, lang_masks, state, noise, self.config.use_cache)


class SmolVLAPolicy(FlowMatchingPolicy):
    """The trainable policy: `forward(batch)` gives the loss, `predict_action_chunk(batch)` normalized actions.

    The batch is already normalized and tokenized (see finetune.policies.processor): camera images (B, 3, H, W) in
    [0, 1], `observation.state`, `observation.language.tokens` / `.attention_mask`, and for training `action` and
    `action_is_pad`.
    """

    config_class = SmolVLAConfig
    # LeRobot's default LoRA targets for SmolVLA: the expert's q/v projections and the action/state projections.
    default_lora_targets = (
        r"(model\.vlm_with_expert\.lm_expert\..*\.(q|v)_proj|"
        r"model\.(state_proj|action_in_proj|action_out_proj|action_time_mlp_in|action_time_mlp_out))"
    )

    def __init__(self, config: SmolVLAConfig, vlm_config: SmolVLMConfig | None = None):
        super().__init__()
        self.config = config
        self.vlm_config = vlm_config or make_vlm_config(config.vlm_model_name)
        self.model = VLAFlowMatching(config, self.vlm_config)
        self._finish_init()

    def _vlm(self) -> nn.Module:
        return self.model.vlm_with_expert.vlm

    def _vision_tower(self) -> nn.Module:
        return self._vlm().model.vision_model

    def _text_model(self) -> nn.Module:
        return self._vlm().model.text_model

    def frozen_in_full_training(self) -> list[nn.Module]:
        """LeRobot's SmolVLA rules: the shared ones (SigLIP without the connector; with train_expert_only the whole
        VLM); otherwise the VLM parts whose outputs nothing reads stay frozen: lm_head, the final text norm, and in the
        last layer(s) the query/output projections, post-attention norm and MLP (LeRobot's intent; its name patterns
        only catch lm_head under transformers 5). The last layer's input norm and key/value projections train: the
        expert attends to their outputs. state_proj trains only with train_state_proj."""
        vlm_with_expert, vlm = self.model.vlm_with_expert, self._vlm()
        frozen = super().frozen_in_full_training()
        if not self.config.train_expert_only:
            text = self._text_model()
            last = [vlm_with_expert.num_vlm_layers - 1]
            n_vlm, n_expert = vlm_with_expert.num_vlm_layers, vlm_with_expert.num_expert_layers
            if n_vlm != n_expert and n_vlm % n_expert == 0:
                last.append(n_vlm - 2)
            frozen += [vlm.lm_head, text.norm]
            for layer in (text.layers[i] for i in last):
                frozen += [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.post_attention_layernorm, layer.mlp]
        if not self.config.train_state_proj:
            frozen.append(self.model.state_proj)
        return frozen

    def quantization_scopes(self, include_vision: bool) -> tuple[str, ...]:
        """Module-name prefixes whose linear layers a quantized base stores in 8/4-bit (the big frozen matrices;
        lm_head is unused by the policy but part of LeRobot's checkpoint)."""
        vlm = "model.vlm_with_expert.vlm."
        scopes = (f"{vlm}model.text_model.layers.", "model.vlm_with_expert.lm_expert.layers.", f"{vlm}lm_head")
        return scopes + ((f"{vlm}model.vision_model.", f"{vlm}model.connector.") if include_vision else ())

    def prepare_image(self, batch: dict[str, Tensor], key: str, image: Tensor) -> tuple[Tensor, Tensor]:
        """Resized with padding on the left and top (LeRobot's SmolVLA), scaled to [-1, 1] for SigLIP."""
        if self.config.resize_imgs_with_padding is not None:
            image = resize_with_pad(image, *self.config.resize_imgs_with_padding, pad_value=0)
        pad_key = f"{key}_padding_mask"
        mask = batch[pad_key].bool() if pad_key in batch else torch.ones(image.shape[0], dtype=torch.bool,
                                                                            device=image.device)
        return image * 2.0 - 1.0, mask
