"""float32 linear layers through oneDNN's GEMM on CPU.

torch's CPU `linear`/`mm` calls MKL's sgemm. On CPUs that MKL does not give its AVX-512 kernels (AMD EPYC among
them) that runs at about half the core's float32 peak, while oneDNN (bundled with torch as MKL-DNN) JITs AVX-512
kernels for whatever CPU it finds: on this project's AMD EPYC dev machine 310-470 GFLOP/s against MKL's 180-220 on
the same two cores, forward and both backward products (`bench/linear.py`; the whole step: `bench/step.py`). The
math is the same float32 multiply-accumulate in another order: outputs agree with MKL's to float32 rounding (tested
against float64).

`use_cpu_linear(model, "onednn")` turns every plain `nn.Linear` (base layers, LoRA's A/B, heads) into a
`OneDNNLinear`, a subclass with the same parameters and state dict, so PEFT wrappers, saving and merging see no
difference. It takes the oneDNN path only for float32 CPU inputs outside autocast and torch.compile; anything else
(CUDA, bf16, half storage, autocast, compiled graphs) goes through `F.linear` as before. Quantized layers
(bitsandbytes) are not plain `nn.Linear`s and are left alone.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CPU_LINEARS = ("onednn", "aten")
CpuLinear = Literal["onednn", "aten"]


def _onednn_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias for (..., K) x and an (N, K) weight, strided views accepted (no transposed copies)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dx = dy @ W = linear(dy, W.T)
            grad_x = _onednn_matmul(grad, weight.t(), None)
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:  # dW = dy.T @ x = linear(dy.T, x.T)
            grad_w = _onednn_matmul(flat.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose float32 CPU products run on oneDNN; every other case is `F.linear`."""

    def forward(self, x: Tensor) -> Tensor:
        # under torch.compile (compile_model) inductor plans the GEMMs itself and cannot lower this op's inputs
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.numel() > 0 and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return _OneDNNLinearFn.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def onednn_available() -> bool:
    """oneDNN is compiled in and its linear op runs here (a tiny probe, so a torch without it falls back)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        _onednn_matmul(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4))
    except (RuntimeError, AttributeError):
        return False
    return True


def use_cpu_linear(model: nn.Module, kind: CpuLinear) -> int:
    """Route the model's plain linear layers through `kind` ("onednn" or "aten"); returns how many were switched.

    "onednn" falls back to "aten" where oneDNN is not available."""
    if kind not in CPU_LINEARS:
        raise ValueError(f"unknown CPU linear kernel {kind!r}; choose one of {CPU_LINEARS}")
    if kind == "onednn" and not onednn_available():
        kind = "aten"
    source, target = (nn.Linear, OneDNNLinear) if kind == "onednn" else (OneDNNLinear, nn.Linear)
    switched = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            switched += 1
    return switched
