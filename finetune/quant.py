"""QLoRA-style low-VRAM bases: the frozen backbone's linear layers in 8-bit (LLM.int8) or 4-bit (NF4/FP4).

The policy is loaded in full precision, then each linear layer of the language backbone, the action expert (and the
vision tower unless --quant.keep-vision) is swapped for its bitsandbytes counterpart and quantized when moved to the
device. Norms, embeddings, the small state/action/time projections and modules trained in full stay in full
precision. The policy then says it is loaded in 8/4-bit, which is what makes PEFT attach its bitsandbytes LoRA layers.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError, QuantOptions
from .policies.common import DTYPES


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
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=DTYPES[opts.compute_dtype], quant_type=opts.quant_type,
                                  quant_storage=storage, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to(DTYPES[opts.compute_dtype]), requires_grad=False,
                                         quant_type=opts.quant_type, compress_statistics=opts.double_quant,
                                         quant_storage=storage)
        # bitsandbytes' CPU inference path repacks the weight in place and needs in_features divisible by the block
        # size (the 720-wide SmolVLA expert is not); the plain path works for every shape, in training and eval.
        layer.support_avx512bf16_for_cpu = False
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
    return type(module).__name__ in ("Linear8bitLt", "Linear4bit")


def dequantize_policy(policy: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every bitsandbytes layer by an nn.Linear holding its dequantized weight (e.g. before a merge)."""
    bnb = _bnb()
    for name, module in list(policy.named_modules()):
        if not is_quantized_layer(module):
            continue
        weight = module.weight
        if type(module).__name__ == "Linear4bit":
            dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
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
