"""QLoRA-style low-VRAM bases: the frozen backbone's linear layers in 8-bit (LLM.int8) or 4-bit (NF4/FP4).

The policy is loaded in full precision, then each linear layer of the language backbone, the action expert (and the
vision tower unless --quant.keep-vision) is swapped for its bitsandbytes counterpart and quantized when moved to the
device. Norms, embeddings, the small state/action/time projections and modules trained in full stay in full
precision. The policy then says it is loaded in 8/4-bit, which is what makes PEFT attach its bitsandbytes LoRA layers.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import ConfigError, QuantOptions
from finetune.policies.common import DTYPES


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise ConfigError("--quant.* needs bitsandbytes: pip install bitsandbytes") from err
    return bnb


def quantization_targets(policy: nn.Module, opts: QuantOptions, keep: list[str]) -> list[str]:
    """Names of the linear layers to quantize: inside the policy's quantizable scope, outside `keep`."""
    scopes = policy.quantization_scopes(include_vision=not opts.keep_vision)
    names = []
    for name, module in policy.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith(scopes):
            continue
        if any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in (*keep, *opts.skip_modules)):
            continue
        names.append(name)
    return names


def _quantized_linear(linear: nn.Linear, opts: QuantOptions) -> nn.Module:
    bnb = _bnb()
    weight = linear.weight.data
    has_bias = linear.bias is not None
    if opts.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=opts.int8_threshold, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        storage = DTYPES[opts.storage_dtype]
        layer = linear4bit_class()(linear.in_features, linear.out_features, bias=has_bias,
                                   compute_dtype=DTYPES[opts.compute_dtype], quant_type=opts.quant_type,
                                   quant_storage=storage, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to(DTYPES[opts.compute_dtype]), requires_grad=False,
                                         quant_type=opts.quant_type, compress_statistics=opts.double_quant,
                                         quant_storage=storage)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer


def quantize_policy(policy: nn.Module, opts: QuantOptions, device: torch.device, keep: list[str]) -> nn.Module:
    """Swap the targeted linear layers for bitsandbytes ones and quantize them on `device` (in place)."""
    targets = quantization_targets(policy, opts, keep)
    if not targets:
        raise ConfigError("--quant: the policy has no linear layer to quantize in its backbone scopes")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = policy.get_submodule(parent_name)
        # bitsandbytes quantizes a weight when it is moved to the device: one layer at a time, so the peak is the
        # full-precision base plus one layer, not two copies of the base.
        setattr(parent, child, _quantized_linear(getattr(parent, child), opts).to(device))
    policy.to(device)
    policy.is_loaded_in_8bit = opts.load_in_8bit
    policy.is_loaded_in_4bit = opts.load_in_4bit
    policy.quantization_method = "bitsandbytes"
    for p in policy.parameters():
        p.requires_grad_(False)
    return policy


def enable_input_require_grads(policy: nn.Module) -> None:
    """Make the embeddings' outputs require grad, so reentrant checkpointing of a frozen base still back-propagates
    into the adapters (peft #137). Harmless with the non-reentrant checkpointing used here."""

    def make_output_require_grad(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            output.requires_grad_(True)

    policy.input_embeddings_module().register_forward_hook(make_output_require_grad)


def is_quantized_layer(module: nn.Module) -> bool:
    return any(cls.__name__ in ("Linear8bitLt", "Linear4bit") for cls in type(module).__mro__)


def is_4bit_layer(module: nn.Module) -> bool:
    return any(cls.__name__ == "Linear4bit" for cls in type(module).__mro__)


def dequantize_4bit(weight) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (Params4bit) back in its compute dtype, in torch: the packed codes (two per byte,
    the first in the high nibble) looked up in the quant state's 16 levels and scaled by their block's absmax (itself
    8-bit quantized under double quantization), over the row-major flattened weight.

    bitsandbytes 0.50's native CPU kernel gets this wrong for many widths that are not a multiple of the block size
    (e.g. 48, 80, 96, 720: values scaled by another block's absmax); its CUDA kernel and generic torch path are right,
    and this equals them (tests/test_quant.py, tests/test_merge.py)."""
    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = _bnb().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = weight.data.view(torch.uint8).reshape(-1)
    n = math.prod(state.shape)
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1)[:n].long()
    values = state.code.to(device=absmax.device, dtype=torch.float32)[codes]
    values = F.pad(values, (0, (-n) % state.blocksize)).view(-1, state.blocksize) * absmax.float()[:, None]
    return values.reshape(-1)[:n].view(state.shape).to(state.dtype)


class _Dequantized4bitLinear(torch.autograd.Function):
    """x @ W^T + b with W dequantized on the fly in the forward and again in the backward (no dense copy kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, dequantize_4bit(weight).to(x.dtype), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ dequantize_4bit(ctx.weight).to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


@functools.cache
def linear4bit_class() -> type[nn.Module]:
    """bitsandbytes' Linear4bit, with CPU inputs routed through `dequantize_4bit` instead of its native CPU kernel
    (wrong for many widths, see there); CUDA inputs take bitsandbytes' own path. Built on first use: bitsandbytes
    loads lazily."""
    bnb = _bnb()

    class Linear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu":
                return super().forward(x)
            compute = self.compute_dtype or x.dtype
            bias = None if self.bias is None else self.bias.to(compute)
            if bias is not None and bias.requires_grad:
                raise RuntimeError("a trainable bias on a 4-bit layer is not supported; train it as a full module")
            return _Dequantized4bitLinear.apply(x.to(compute), self.weight, bias).to(x.dtype)

    Linear4bit.__qualname__ = "Linear4bit"
    Linear4bit.__module__ = __name__
    return Linear4bit


def dequantize_policy(policy: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every bitsandbytes layer by an nn.Linear holding its dequantized weight (e.g. before a merge)."""
    for name, module in list(policy.named_modules()):
        if not is_quantized_layer(module):
            continue
        weight = module.weight
        if is_4bit_layer(module):
            dense = dequantize_4bit(weight)
        else:
            # the row scales move from the parameter to the layer state after the first forward
            scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
            dense = weight.data.float() * scales.float().unsqueeze(1) / 127.0
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=dense.device, dtype=dtype)
        linear.weight.data.copy_(dense.to(dtype))
        if module.bias is not None:
            linear.bias.data.copy_(module.bias.data.to(dtype))
        linear.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(policy.get_submodule(parent_name), child, linear)
    for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit"):
        if hasattr(policy, flag):
            setattr(policy, flag, False)
    return policy


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by parameters and buffers (quantized weights count as stored, with their scales)."""
    total = sum(t.numel() * t.element_size() for t in module.parameters())
    total += sum(t.numel() * t.element_size() for t in module.buffers())
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:  # 4-bit: absmax (and nested double-quant statistics)
            for t in (state.absmax, getattr(state.state2, "absmax", None) if state.nested else None, state.code):
                if t is not None:
                    total += t.numel() * t.element_size()
        scb = getattr(weight, "SCB", None)
        if scb is None and getattr(sub, "state", None) is not None:
            scb = getattr(sub.state, "SCB", None)
        if scb is not None:  # 8-bit: one scale per row
            total += scb.numel() * scb.element_size()
    return total


def check_quantized_topology(opts: QuantOptions, policy_dtype: str, distributed_type: str,
                             zero_stage: int | None) -> None:
    """Refuse distributed setups a quantized base is known to break in, with the reason and what to use instead.

    Each rank quantizes its own copy of the base on its own device, which is what DDP and ZeRO-1/2 need.
    """
    if not opts.enabled:
        return
    if distributed_type == "FSDP":
        raise ConfigError("a quantized base cannot be sharded by FSDP (it cannot flatten int8/packed 4-bit weights); "
                          "use accelerate_configs/ddp.yaml or zero2.yaml, where each rank holds its own quantized copy")
    if zero_stage == 3 and opts.load_in_8bit:
        raise ConfigError("an 8-bit base under DeepSpeed ZeRO-3 trains with a wrong loss or fails (bitsandbytes "
                          "#1451, accelerate #3730): ZeRO-3 cannot partition LLM.int8 weights. Use "
                          "accelerate_configs/ddp.yaml or zero2.yaml (the 8-bit base is small enough to replicate), or "
                          "--quant.load-in-4bit with --quant.storage-dtype equal to --policy.dtype")
    if zero_stage == 3 and opts.load_in_4bit and opts.storage_dtype != policy_dtype:
        raise ConfigError(f"a 4-bit base under DeepSpeed ZeRO-3 needs --quant.storage-dtype equal to the model dtype "
                          f"(--policy.dtype {policy_dtype}), so ZeRO can partition the packed weights with the rest; "
                          f"got {opts.storage_dtype}. Or use accelerate_configs/ddp.yaml / zero2.yaml")
