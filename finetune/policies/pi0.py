"""pi0 on transformers' PaliGemma plus a Gemma action expert, with LeRobot's module names, state-dict keys and fields.

`PI0Policy.model` is LeRobot's `PI0Pytorch`: `paligemma_with_expert` holds the PaliGemma VLM (SigLIP + Gemma 2B) and
the Gemma 300M action expert (`gemma_expert`, token embeddings dropped), run layer by layer over one joint sequence:
each layer computes q/k/v per tower, concatenates them, applies the PaliGemma LM's rotary embedding and Gemma's eager
attention under a block mask (prefix bidirectional, suffix attending to the prefix and causally to itself), then each
tower's own o_proj and MLP. The prefix is images + language; the suffix is a state token and the noisy action chunk.
pi0.5 (finetune/policies/pi05.py) reuses all of it with adaRMS time conditioning in the expert.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import GemmaConfig, GemmaModel, PaliGemmaConfig, PaliGemmaForConditionalGeneration
from transformers.models.gemma.modeling_gemma import GemmaRotaryEmbedding, apply_rotary_pos_emb, eager_attention_forward

from finetune.policies.base import FlowMatchingModel, FlowMatchingPolicy, PolicyConfig
from finetune.policies.common import compute_dtype, sdpa_attention, sinusoidal_time_embedding

PALIGEMMA_TOKENIZER = "google/paligemma-3b-pt-224"  # the tokenizer LeRobot's pi0/pi0.5 processors load
PALIGEMMA_VOCAB_SIZE = 257152
ATTENTION_MASK_VALUE = -2.3819763e38  # openpi's additive mask value for masked scores (LeRobot's constant)

# openpi's Gemma variants (LeRobot's `get_gemma_config`): the architectures behind paligemma_variant and
# action_expert_variant, known without the Hub.
GEMMA_VARIANTS: dict[str, dict[str, int]] = {
    "gemma_2b": {"width": 2048, "depth": 18, "mlp_dim": 16_384, "num_heads": 8, "num_kv_heads": 1, "head_dim": 256},
    "gemma_300m": {"width": 1024, "depth": 18, "mlp_dim": 4096, "num_heads": 8, "num_kv_heads": 1, "head_dim": 256},
}
# SigLIP So400m/14 as PaliGemma 3B uses it (no pooling head; LeRobot sets the MLP to 4304).
SIGLIP_SO400M: dict[str, int] = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
    "patch_size": 14,
}


@dataclass
class PI0Config(PolicyConfig):
    """LeRobot's PI0Config fields (same names and defaults)."""

    type: ClassVar[str] = "pi0"

    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    dtype: str = "float32"
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_inference_steps: int = 10
    time_sampling_beta_alpha: float = 1.5
    time_sampling_beta_beta: float = 1.0
    time_sampling_scale: float = 0.999
    time_sampling_offset: float = 0.001
    min_period: float = 4e-3
    max_period: float = 4.0
    use_relative_actions: bool = False
    relative_exclude_joints: list[str] = field(default_factory=lambda: ["gripper"])
    action_feature_names: list[str] | None = None
    rtc_config: dict[str, Any] | None = None
    image_resolution: tuple[int, int] = (224, 224)
    empty_cameras: int = 0
    normalization_mapping: dict[str, str] = field(
        default_factory=lambda: {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    )
    gradient_checkpointing: bool = False
    compile_model: bool = False
    compile_mode: str = "max-autotune"
    freeze_vision_encoder: bool = False
    train_expert_only: bool = False
    optimizer_lr: float = 2.5e-5
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 0.01
    optimizer_grad_clip_norm: float = 1.0
    scheduler_warmup_steps: int = 1_000
    scheduler_decay_steps: int = 30_000
    scheduler_decay_lr: float = 2.5e-6
    tokenizer_max_length: int = 48

    @property
    def num_steps(self) -> int:
        """Denoising steps under the project's common name (--policy.num-steps); LeRobot's num_inference_steps."""
        return self.num_inference_steps

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        self.num_inference_steps = value

    @property
    def tokenizer_name(self) -> str:
        return PALIGEMMA_TOKENIZER


# --- backbone architecture --------------------------------------------------------------------------------------------


def builtin_backbone_spec(config: PI0Config) -> dict[str, Any] | None:
    """The PaliGemma 3B + expert architecture named by the config's variants, or None for unknown variant names."""
    if config.paligemma_variant not in GEMMA_VARIANTS or config.action_expert_variant not in GEMMA_VARIANTS:
        return None
    return {
        "vision": dict(SIGLIP_SO400M),
        "paligemma": dict(GEMMA_VARIANTS[config.paligemma_variant]),
        "action_expert": dict(GEMMA_VARIANTS[config.action_expert_variant]),
        "vocab_size": PALIGEMMA_VOCAB_SIZE,
    }


def resolve_backbone_spec(config: PI0Config, spec: dict[str, Any] | None) -> dict[str, Any]:
    """An explicit spec (vlm_config.json beside a tiny/custom policy) or the built-in one for the config's variants."""
    spec = spec if spec is not None else builtin_backbone_spec(config)
    if spec is None:
        raise ValueError(
            f"unknown {config.type} backbone variants {config.paligemma_variant!r} / {config.action_expert_variant!r}: "
            f"known offline are {sorted(GEMMA_VARIANTS)}. Put the architecture in the policy folder as vlm_config.json "
            "(keys vision, paligemma, action_expert, vocab_size)."
        )
    vlm, expert = spec["paligemma"], spec["action_expert"]
    shared = ("num_heads", "num_kv_heads", "head_dim")
    if any(vlm[k] != expert[k] for k in shared):
        raise ValueError(f"the VLM and the action expert attend jointly, so their {shared} must match: "
                         f"{[vlm[k] for k in shared]} vs {[expert[k] for k in shared]}")
    if config.image_resolution[0] != config.image_resolution[1]:
        raise ValueError(f"PaliGemma takes square images; image_resolution is {config.image_resolution}")
    return copy.deepcopy(spec)


def _gemma_kwargs(variant: dict[str, int], vocab_size: int) -> dict[str, Any]:
    return {
        "hidden_size": variant["width"], "intermediate_size": variant["mlp_dim"], "num_hidden_layers": variant["depth"],
        "num_attention_heads": variant["num_heads"], "num_key_value_heads": variant["num_kv_heads"],
        "head_dim": variant["head_dim"], "vocab_size": vocab_size, "hidden_act": "gelu_pytorch_tanh",
    }


def make_backbone_configs(spec: dict[str, Any], image_size: int) -> tuple[PaliGemmaConfig, GemmaConfig]:
    """transformers configs of the PaliGemma VLM and the Gemma expert, as LeRobot builds them."""
    vocab = spec["vocab_size"]
    vlm_width = spec["paligemma"]["width"]
    vlm_config = PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", **spec["vision"], "image_size": image_size,
                       "vision_use_head": False},
        text_config={"model_type": "gemma", **_gemma_kwargs(spec["paligemma"], vocab)},
        image_token_index=vocab, vocab_size=vocab, projection_dim=vlm_width, hidden_size=vlm_width,
    )
    return vlm_config, GemmaConfig(**_gemma_kwargs(spec["action_expert"], vocab))


# --- the two towers ---------------------------------------------------------------------------------------------------


class AdaRMSNorm(nn.Module):
    """pi0.5's adaptive RMSNorm: a condition (the flow time) gives per-sample scale, shift and a residual gate.

    `dense` maps the condition to 3 x width and starts at zero weight, so a fresh layer is the identity RMSNorm.
    Returns (normalized, gate); the residual that follows adds gate x update.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim, bias=True)
        nn.init.zeros_(self.dense.weight)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        variance = x.float().square().mean(dim=-1, keepdim=True)
        normed = x * torch.rsqrt(variance + self.eps)  # float32 whatever x's dtype, as LeRobot
        modulation = self.dense(cond.to(compute_dtype(self.dense, cond)))
        if x.ndim == 3 and modulation.ndim == 2:
            modulation = modulation[:, None, :]
        scale, shift, gate = modulation.chunk(3, dim=-1)
        normed = normed * (1 + scale.float()) + shift.float()
        return normed.to(x.dtype), gate.to(x.dtype)


def _norm(norm: nn.Module, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if isinstance(norm, AdaRMSNorm):
        if cond is None:
            raise ValueError("an adaRMS layer needs its condition (the flow time embedding)")
        return norm(x, cond)
    return norm(x), None


def _gated_residual(residual: Tensor, update: Tensor, gate: Tensor | None) -> Tensor:
    return residual + update if gate is None else residual + update * gate


class GemmaExpert(nn.Module):
    """LeRobot's `gemma_expert` (a Gemma causal LM): `model.layers.N` and `model.norm`, with neither token embeddings
    nor the LM head, which flow matching never uses (the head alone is 263M parameters at full size)."""

    def __init__(self, config: GemmaConfig, use_adarms: bool):
        super().__init__()
        self.model = GemmaModel(config)
        self.model.embed_tokens = None
        if use_adarms:
            width, eps = config.hidden_size, config.rms_norm_eps
            for layer in self.model.layers:
                layer.input_layernorm = AdaRMSNorm(width, width, eps)
                layer.post_attention_layernorm = AdaRMSNorm(width, width, eps)
            self.model.norm = AdaRMSNorm(width, width, eps)


class SiglipVisionTower(nn.Module):
    """Keeps LeRobot's keys `vision_tower.vision_model.*`: transformers 5.4/5.5 (LeRobot 0.6's) nest SigLIP's
    transformer under `vision_model`; later 5.x releases flattened it into the vision tower itself."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: Tensor, **kwargs: Any) -> Any:
        return self.vision_model(pixel_values, **kwargs)


class PaliGemmaWithExpertModel(nn.Module):
    """LeRobot's `paligemma_with_expert`: both towers run jointly, layer by layer."""

    def __init__(self, vlm_config: PaliGemmaConfig, expert_config: GemmaConfig, use_adarms: bool = False):
        super().__init__()
        self.paligemma = PaliGemmaForConditionalGeneration(vlm_config)
        if not hasattr(self.paligemma.model.vision_tower, "vision_model"):
            self.paligemma.model.vision_tower = SiglipVisionTower(self.paligemma.model.vision_tower)
        self.gemma_expert = GemmaExpert(expert_config, use_adarms)
        if len(self.language_model.layers) != len(self.gemma_expert.model.layers):
            raise ValueError("pi0 pairs every VLM layer with an expert layer: the two depths must be equal")
        self.gradient_checkpointing = False
        self.attn_implementation = "sdpa"  # or "eager": Gemma's eager attention with openpi's additive mask

    @property
    def language_model(self) -> nn.Module:
        return self.paligemma.model.language_model

    def vlm_parameters(self) -> Iterator[nn.Parameter]:
        """Everything that computes the prefix (SigLIP, the projector, Gemma's embeddings and layers)."""
        return self.paligemma.parameters()

    def embed_image(self, image: Tensor) -> Tensor:
        """SigLIP + the multi-modal projector (transformers 5.x does not rescale the features; neither does LeRobot)."""
        vision = self.paligemma.model.vision_tower
        image = image.to(vision.vision_model.embeddings.patch_embedding.weight.dtype)
        return self.paligemma.model.get_image_features(image).pooler_output

    def embed_language_tokens(self, tokens: Tensor) -> Tensor:
        """Gemma's embeddings; transformers' Gemma embedding module already multiplies by sqrt(width): once only."""
        return self.language_model.get_input_embeddings()(tokens)

    def forward(
        self,
        attention_mask: Tensor,
        position_ids: Tensor,
        inputs_embeds: list[Tensor | None],
        adarms_cond: list[Tensor | None] | None = None,
        kv_cache: dict[int, tuple[Tensor, Tensor]] | None = None,
        fill_kv_cache: bool = False,
    ) -> tuple[list[Tensor | None], dict[int, tuple[Tensor, Tensor]] | None]:
        """Run both towers over [prefix, suffix] (either may be None) under a boolean (B, Q, K) attention mask.

        With `fill_kv_cache` (prefix only) every layer stores its post-RoPE keys/values; with a filled `kv_cache` the
        suffix attends to those and its own tokens. Returns the final-normed outputs per tower and the cache.
        """
        adarms_cond = adarms_cond or [None, None]
        if fill_kv_cache:
            kv_cache = {}
        if self.attn_implementation == "eager":  # float32 additive mask, as LeRobot's
            attention_mask = torch.where(attention_mask[:, None], 0.0, ATTENTION_MASK_VALUE)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for idx in range(len(self.language_model.layers)):
            args = (idx, inputs_embeds, attention_mask, position_ids, adarms_cond, kv_cache, fill_kv_cache)
            if use_checkpoint:
                # preserve_rng_state (unlike LeRobot's False): the recomputed forward draws the same dropout masks
                # (--peft.lora-dropout), so the gradients are those of the forward that ran.
                inputs_embeds = checkpoint(self._layer, *args, use_reentrant=False, preserve_rng_state=True)
            else:
                inputs_embeds = self._layer(*args)
        norms = [self.language_model.norm, self.gemma_expert.model.norm]
        outputs = [None if h is None else _norm(norms[i], h, adarms_cond[i])[0] for i, h in enumerate(inputs_embeds)]
        return outputs, kv_cache

    def _layer(self, idx, inputs_embeds, attention_mask, position_ids, adarms_cond, kv_cache, fill_kv_cache):
        layers = [self.language_model.layers[idx], self.gemma_expert.model.layers[idx]]
        queries, keys, values, gates = [], [], [], []
        for hidden, layer, cond in zip(inputs_embeds, layers, adarms_cond, strict=True):
            if hidden is None:
                gates.append(None)
                continue
            attn = layer.self_attn
            normed, gate = _norm(layer.input_layernorm, hidden, cond)
            normed = normed.to(compute_dtype(attn.q_proj, normed))
            shape = (*normed.shape[:-1], -1, attn.head_dim)
            queries.append(attn.q_proj(normed).view(shape).transpose(1, 2))
            keys.append(attn.k_proj(normed).view(shape).transpose(1, 2))
            values.append(attn.v_proj(normed).view(shape).transpose(1, 2))
            gates.append(gate)
        query, key, value = torch.cat(queries, dim=2), torch.cat(keys, dim=2), torch.cat(values, dim=2)
        cos, sin = self.language_model.rotary_emb(query, position_ids)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if fill_kv_cache:
            kv_cache[idx] = (key, value)
        elif kv_cache is not None:
            key = torch.cat([kv_cache[idx][0], key], dim=2)
            value = torch.cat([kv_cache[idx][1], value], dim=2)
        attn = layers[0].self_attn
        if self.attn_implementation == "eager":
            att_output, _ = eager_attention_forward(attn, query, key, value, attention_mask, scaling=attn.scaling)
        else:
            att_output = sdpa_attention(query, key, value, attention_mask, attn.scaling).transpose(1, 2)
        att_output = att_output.reshape(*att_output.shape[:2], -1)

        outputs, start = [], 0
        for hidden, layer, cond, gate in zip(inputs_embeds, layers, adarms_cond, gates, strict=True):
            if hidden is None:
                outputs.append(None)
                continue
            end = start + hidden.shape[1]
            att = att_output[:, start:end]
            start = end
            out = _gated_residual(hidden, layer.self_attn.o_proj(att.to(compute_dtype(layer.self_attn.o_proj, att))),
                                  gate)
            normed, gate = _norm(layer.post_attention_layernorm, out, cond)
            normed = normed.to(compute_dtype(layer.mlp.up_proj, normed))
            outputs.append(_gated_residual(out, layer.mlp(normed), gate))
        return outputs


# --- flow matching ----------------------------------------------------------------------------------------------------


class PI0FlowMatching(FlowMatchingModel):
    """LeRobot's `PI0Pytorch` (the policy's `model`): prefix/suffix embedding, the joint transformer, the flow head."""

    use_adarms: ClassVar[bool] = False  # pi0.5 conditions the expert's norms on the time instead
    state_token: ClassVar[bool] = True  # pi0.5 has the state in the prompt instead

    def __init__(self, config: PI0Config, backbone_spec: dict[str, Any]):
        super().__init__(config)
        vlm_config, expert_config = make_backbone_configs(backbone_spec, config.image_resolution[0])
        self.paligemma_with_expert = PaliGemmaWithExpertModel(vlm_config, expert_config, self.use_adarms)
        self.expert_width = expert_config.hidden_size
        self.action_in_proj = nn.Linear(config.max_action_dim, self.expert_width)
        self.action_out_proj = nn.Linear(self.expert_width, config.max_action_dim)
        self._init_time_layers()

    @property
    def joint(self) -> PaliGemmaWithExpertModel:
        return self.paligemma_with_expert

    def _init_time_layers(self) -> None:
        width = self.expert_width
        self.state_proj = nn.Linear(self.config.max_state_dim, width)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)

    def embed_prefix(self, images, img_masks, lang_tokens, lang_masks) -> tuple[Tensor, Tensor, Tensor]:
        """Image tokens per camera, then language tokens; all in one bidirectional block (flags 0)."""
        pwe = self.paligemma_with_expert
        embs, pad_masks = [], []
        for img, img_mask in zip(images, img_masks, strict=True):
            img_emb = pwe.embed_image(img)
            embs.append(img_emb)
            pad_masks.append(img_mask[:, None].expand(img_emb.shape[:2]))
        embs.append(pwe.embed_language_tokens(lang_tokens))
        pad_masks.append(lang_masks.bool())
        dtype = compute_dtype(pwe.language_model.layers[0].self_attn.q_proj, embs[-1])
        embs = torch.cat([e.to(dtype) for e in embs], dim=1)
        pad_masks = torch.cat(pad_masks, dim=1)
        att = torch.zeros_like(pad_masks)
        return embs, pad_masks, att

    def _linear(self, layer: nn.Module, x: Tensor) -> Tensor:
        return layer(x.to(compute_dtype(layer, x)))

    def embed_action_tokens(self, noisy_actions: Tensor, time: Tensor) -> tuple[Tensor, Tensor | None]:
        """pi0: action_in_proj(x_t) fused with the sine-cosine time embedding by a SiLU MLP; no adaRMS condition."""
        action_emb = self._linear(self.action_in_proj, noisy_actions)
        time_emb = sinusoidal_time_embedding(time, self.expert_width, self.config.min_period, self.config.max_period)
        time_emb = time_emb.to(time.dtype)[:, None, :].expand(*action_emb.shape[:2], -1)
        hidden = self._linear(self.action_time_mlp_in, torch.cat([action_emb, time_emb.to(action_emb.dtype)], dim=2))
        return self._linear(self.action_time_mlp_out, F.silu(hidden)), None

    def embed_suffix(self, state: Tensor, noisy_actions: Tensor, time: Tensor) -> tuple[Tensor, Tensor, Tensor, Any]:
        """[state token] + chunk_size action tokens. Flags: state 1, first action 1, the rest 0 (the prefix sees no
        suffix token, the state does not see the actions, the actions see each other)."""
        embs, flags = [], []
        if self.state_token:
            embs.append(self._linear(self.state_proj, state)[:, None, :])
            flags.append(1)
        action_emb, adarms_cond = self.embed_action_tokens(noisy_actions, time)
        embs.append(action_emb)
        flags += [1] + [0] * (action_emb.shape[1] - 1)
        embs = torch.cat([e.to(action_emb.dtype) for e in embs], dim=1)
        batch = embs.shape[0]
        pad_masks = torch.ones(batch, embs.shape[1], dtype=torch.bool, device=embs.device)
        att = torch.tensor(flags, dtype=torch.bool, device=embs.device)[None, :].expand(batch, -1)
        return embs, pad_masks, att, adarms_cond

    def _prefix(self, images, img_masks, lang_tokens, lang_masks, state) -> tuple[Tensor, Tensor, Tensor]:
        return self.embed_prefix(images, img_masks, lang_tokens, lang_masks)  # the state is in the suffix or prompt

    def _suffix(self, state: Tensor, noisy_actions: Tensor, time: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        """embed_suffix, cast to the expert's compute dtype, with pi0.5's adaRMS condition for the expert."""
        embs, pad_masks, att, adarms_cond = self.embed_suffix(state, noisy_actions, time)
        embs = embs.to(compute_dtype(self.paligemma_with_expert.gemma_expert.model.layers[0].self_attn.q_proj, embs))
        return embs, pad_masks, att, {"adarms_cond": [None, adarms_cond]}

    def _velocity(self, suffix_out: Tensor) -> Tensor:
        return self._linear(self.action_out_proj, suffix_out[:, -self.config.chunk_size :].float()).float()

    @torch.no_grad()
    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None,
                       use_cache: bool = True) -> Tensor:
        """Euler-integrate the flow from noise; the prefix goes through the VLM once, into a KV cache (as LeRobot),
        unless `use_cache` is off, which recomputes the whole sequence every step."""
        return self._sample(images, img_masks, lang_tokens, lang_masks, state, noise, use_cache)


# --- the policy -------------------------------------------------------------------------------------------------------


def resize_with_center_pad(images: Tensor, height: int, width: int) -> Tensor:
    """openpi's resize: keep the aspect ratio (bilinear, clamped to [0, 1]), then pad evenly with black."""
    cur_h, cur_w = images.shape[2:]
    if (cur_h, cur_w) == (height, width):
        return images
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return F.pad(resized, (left, width - new_w - left, top, height - new_h - top), value=0.0)


_LM = "model.paligemma_with_expert.paligemma."
_EMBED_KEY, _LM_HEAD_KEY = _LM + "model.language_model.embed_tokens.weight", _LM + "lm_head.weight"
_EXPERT_LM_HEAD_KEY = "model.paligemma_with_expert.gemma_expert.lm_head.weight"


class PI0Policy(FlowMatchingPolicy):
    """The trainable pi0: `forward(batch)` gives the loss, `predict_action_chunk(batch)` normalized actions.

    The batch is already normalized and tokenized (see finetune.policies.processor): camera images (B, 3, H, W) in
    [0, 1], `observation.state`, `observation.language.tokens` / `.attention_mask`, and for training `action` and
    `action_is_pad`.
    """

    config_class: ClassVar[type[PI0Config]] = PI0Config
    flow_matching_class: ClassVar[type[PI0FlowMatching]] = PI0FlowMatching
    # LeRobot's default LoRA targets for pi0: the expert's q/v projections and the state/action/time projections.
    default_lora_targets = (
        r"(.*\.gemma_expert\..*\.self_attn\.(q|v)_proj|"
        r"model\.(state_proj|action_in_proj|action_out_proj|action_time_mlp_in|action_time_mlp_out))"
    )
    # Parameters LeRobot keeps in float32 when the rest is stored in bf16 (load_policy's dtype): SigLIP and the
    # projector, every RMSNorm, and the heads outside the two towers. Same numbers as LeRobot's bf16 pi0.
    keep_in_float32: ClassVar[tuple[str, ...]] = (
        "vision_tower", "multi_modal_projector", "input_layernorm", "post_attention_layernorm", "model.norm",
        "model.state_proj", "model.action_in_proj", "model.action_out_proj", "model.action_time_mlp_",
        "model.time_mlp_",
    )
    # Fields LeRobot has that change what the policy computes and that this project does not implement.
    unsupported_fields: ClassVar[dict[str, Any]] = {}  # relative actions: finetune.policies.relative_actions

    def __init__(self, config: PI0Config, backbone_config: dict[str, Any] | None = None):
        super().__init__()
        self._check_supported(config)
        self.config = config
        self.backbone_spec = resolve_backbone_spec(config, backbone_config)
        self.model = self.flow_matching_class(config, self.backbone_spec)
        self._finish_init()

    def _check_supported(self, config: PI0Config) -> None:
        values = {**config.extra, **{k: getattr(config, k) for k in self.unsupported_fields if hasattr(config, k)}}
        wrong = {k: values[k] for k, default in self.unsupported_fields.items() if values.get(k, default) != default}
        time_sampling = (config.time_sampling_beta_alpha, config.time_sampling_beta_beta, config.time_sampling_scale,
                         config.time_sampling_offset)
        if time_sampling != (1.5, 1.0, 0.999, 0.001):
            wrong["time_sampling_*"] = time_sampling
        if wrong:
            raise ValueError(f"{config.type} config sets {wrong}, which this project does not implement; use the "
                             f"defaults {self.unsupported_fields} and Beta(1.5, 1) * 0.999 + 0.001 time sampling")

    def backbone_config_dict(self) -> dict[str, Any] | None:
        """The architecture to store beside config.json (vlm_config.json), or None when the variants name it."""
        return None if self.backbone_spec == builtin_backbone_spec(self.config) else copy.deepcopy(self.backbone_spec)

    @classmethod
    def fix_state_dict_keys(cls, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accept the key layouts LeRobot/openpi pi0 files come in: without the `model.` prefix, with only one of the
        tied PaliGemma embeddings/LM head, with the expert's unused LM head (dropped here)."""
        out = {k if k.startswith("model.") else f"model.{k}": v for k, v in state_dict.items()}
        out.pop(_EXPERT_LM_HEAD_KEY, None)
        if _EMBED_KEY not in out and _LM_HEAD_KEY in out:
            out[_EMBED_KEY] = out[_LM_HEAD_KEY]
        if _EMBED_KEY in out:  # tied here; the token embeddings are what the policy uses (LeRobot's head is unused)
            out[_LM_HEAD_KEY] = out[_EMBED_KEY]
        return out

    def lerobot_only_tensors(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """Tensors LeRobot's pi0/pi0.5 module has and this one drops: the expert's LM head (never used: the expert's
        outputs go to action_out_proj). LeRobot loads with strict=True and, on a missing key, keeps its random
        initialization with only a printed warning, so an export must hold it; zeros here."""
        spec = self.backbone_spec
        return {_EXPERT_LM_HEAD_KEY: torch.zeros(spec["vocab_size"], spec["action_expert"]["width"], dtype=dtype)}

    def tie_weights(self) -> None:
        """PaliGemma's LM head shares the token embeddings (re-tie after loading with assign=True)."""
        paligemma = self.model.paligemma_with_expert.paligemma
        paligemma.lm_head.weight = paligemma.model.language_model.embed_tokens.weight

    def apply_storage_dtype(self, dtype: torch.dtype) -> None:
        """LeRobot (like openpi's PyTorch port) casts the two towers to bf16 buffers included, so its rotary inverse
        frequencies are bf16-rounded; round ours the same way, so a bf16 pi0 computes LeRobot's numbers."""
        if dtype == torch.float32:
            return
        for module in self.model.paligemma_with_expert.modules():
            if isinstance(module, GemmaRotaryEmbedding):
                module.inv_freq = module.inv_freq.to(dtype).float()

    def quantization_scopes(self, include_vision: bool) -> tuple[str, ...]:
        """Module-name prefixes whose linear layers a quantized base stores in 8/4-bit: the attention and MLP matrices
        of both towers (and SigLIP + projector with include_vision). Not pi0.5's adaRMS norms (LeRobot keeps every
        norm in float32) nor the LM head, which is the token embedding matrix."""
        pwe = self.model.paligemma_with_expert
        prefix = "model.paligemma_with_expert."
        towers = {f"{prefix}paligemma.model.language_model.layers.": len(pwe.language_model.layers),
                  f"{prefix}gemma_expert.model.layers.": len(pwe.gemma_expert.model.layers)}
        scopes = tuple(f"{tower}{i}.{part}." for tower, depth in towers.items() for i in range(depth)
                       for part in ("self_attn", "mlp"))
        if include_vision:
            scopes += (f"{prefix}paligemma.model.vision_tower.", f"{prefix}paligemma.model.multi_modal_projector.")
        return scopes

    # LeRobot's pi0/pi0.5 freezing rules are the shared ones: freeze_vision_encoder freezes SigLIP (not the
    # projector), train_expert_only the whole PaliGemma.
    def _vlm(self) -> nn.Module:
        return self.model.paligemma_with_expert.paligemma

    def _vision_tower(self) -> nn.Module:
        return self._vlm().model.vision_tower

    def _text_model(self) -> nn.Module:
        return self._vlm().model.language_model

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """As every policy, and kept in the config's gradient_checkpointing (LeRobot's pi0 field)."""
        super().set_gradient_checkpointing(enabled)
        self.config.gradient_checkpointing = enabled

    def prepare_image(self, batch: dict[str, Tensor], key: str, image: Tensor) -> tuple[Tensor, Tensor]:
        """Resized with centered padding to image_resolution, scaled to [-1, 1] (SigLIP's range)."""
        image = resize_with_center_pad(image.float(), *self.config.image_resolution)
        return image * 2.0 - 1.0, torch.ones(image.shape[0], dtype=torch.bool, device=image.device)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], noise: Tensor | None = None,
                             use_cache: bool = True) -> Tensor:
        """Normalized action chunk (B, chunk_size, action_dim); use_cache=False recomputes the prefix every step."""
        return self._action_chunk(batch, noise=noise, use_cache=use_cache)
