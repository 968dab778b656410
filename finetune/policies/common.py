"""Flow-matching math and tensor helpers shared by every policy (SmolVLA, pi0, pi0.5).

The conventions follow LeRobot/openpi: t ~ Beta(1.5, 1) squeezed into [0.001, 1], x_t = t * noise + (1 - t) * actions,
the network predicts the velocity u_t = noise - actions, and sampling integrates from t = 1 (noise) to t = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_flow_time(batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Flow-matching time t ~ Beta(1.5, 1.0) * 0.999 + 0.001 (favours the noisy end, as pi0)."""
    if generator is None:
        beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
        t = beta.sample((batch_size,))
    else:  # Beta(a, 1) has the closed-form inverse CDF u ** (1 / a); lets a private generator drive it.
        t = torch.rand(batch_size, generator=generator) ** (1 / 1.5)
    return (t * 0.999 + 0.001).to(device=device, dtype=torch.float32)


def sinusoidal_time_embedding(time: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """Sine-cosine embedding of a scalar time per sample, shape (B, dim); computed in float64 like LeRobot."""
    if dim % 2 != 0:
        raise ValueError(f"time embedding width must be even, got {dim}")
    dtype = torch.float64 if time.device.type not in ("mps",) else torch.float32
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    angles = (2 * math.pi / period)[None, :] * time[:, None].to(dtype)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def make_att_2d_masks(pad_masks: Tensor, att_masks: Tensor) -> Tensor:
    """Block-causal mask: token i sees token j when cumsum(att)[j] <= cumsum(att)[i] and neither is padding.

    A 1 in `att_masks` opens a new block that earlier tokens cannot see; runs of 0s attend bidirectionally.
    """
    cumsum = torch.cumsum(att_masks.long(), dim=1)
    causal = cumsum[:, None, :] <= cumsum[:, :, None]
    pad = pad_masks[:, None, :] & pad_masks[:, :, None]
    return causal & pad


def resize_with_pad(images: Tensor, height: int, width: int, pad_value: float = 0.0) -> Tensor:
    """Resize (B, C, H, W) keeping the aspect ratio, then pad on the left and top to (height, width)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    cur_h, cur_w = images.shape[2:]
    if (cur_h, cur_w) == (height, width):
        return images
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return F.pad(resized, (max(0, width - new_w), 0, max(0, height - new_h), 0), value=pad_value)


def compute_dtype(linear: torch.nn.Module, fallback: Tensor) -> torch.dtype:
    """The dtype a linear layer computes in (quantized weights are stored as ints: keep the input's dtype)."""
    weight = getattr(linear, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    return fallback.dtype


def pad_last_dim(x: Tensor, size: int) -> Tensor:
    """Zero-pad the last dimension to `size` (state/action vectors are padded to max_state_dim/max_action_dim)."""
    if x.shape[-1] > size:
        raise ValueError(f"vector of width {x.shape[-1]} does not fit the policy's maximum of {size}")
    return F.pad(x, (0, size - x.shape[-1]))


def flow_matching_targets(actions: Tensor, noise: Tensor, time: Tensor) -> tuple[Tensor, Tensor]:
    """Noisy actions x_t and the velocity target u_t for a batch."""
    t = time[:, None, None]
    return t * noise + (1 - t) * actions, noise - actions


def masked_action_loss(per_element: Tensor, action_dim: int, action_is_pad: Tensor | None) -> Tensor:
    """Mean of per-element losses over the real action dims and the in-episode chunk steps (LeRobot's reduction)."""
    losses = per_element[:, :, :action_dim]
    if action_is_pad is None:
        return losses.mean()
    valid = (~action_is_pad).to(losses.dtype).unsqueeze(-1)
    num_valid = (valid.sum() * losses.shape[-1]).clamp_min(1)
    return (losses * valid).sum() / num_valid


def euler_sample(denoise: Callable[[Tensor, Tensor], Tensor], noise: Tensor, num_steps: int) -> Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 to t = 0 in `num_steps` Euler steps."""
    # Step i runs at t = 1 + i * dt computed in Python floats, then cast to float32, as LeRobot 0.6 does (its shared
    # euler_integrate for SmolVLA, pi0 and pi0.5): the sampled times, and so the actions, match bit for bit.
    dt = -1.0 / num_steps
    x_t = noise
    for step in range(num_steps):
        time = torch.tensor(1.0 + step * dt, dtype=torch.float32, device=noise.device)
        x_t = x_t + dt * denoise(x_t, time.expand(noise.shape[0]))
    return x_t


# --- attention --------------------------------------------------------------------------------------------------------

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def check_attn_implementation(name: str) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {ATTN_IMPLEMENTATIONS}")
    return name


def sdpa_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float) -> Tensor:
    """torch's fused attention on (B, H, Q, D) queries and (B, H_kv, K, D) keys/values under a (B, Q, K) boolean mask.

    Fused kernels accumulate the scores and the softmax in float32 for half-precision inputs, as the eager paths'
    float32 softmax does. Rows that see nothing (padding queries) come out as zeros instead of the eager path's
    uniform average; no real token reads them (padding is masked out as a key for every other token).
    """
    key, value = key.to(query.dtype), value.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scale,
                                          enable_gqa=key.shape[1] != query.shape[1])


def set_vision_attn_implementation(vision: torch.nn.Module, name: str) -> None:
    """transformers' vision towers read `config._attn_implementation` at every forward."""
    for module in vision.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name
